"""esa from Python: every command as a function, with the command line's options as keyword arguments.

``esa.profile(model="...", text_file="...", seq_len=256, metric="grad_x_weight", mode="global", topk=50,
device="cpu", out_dir="...")`` runs exactly what ``esa profile --model ... --text-file ... --seq-len 256 ...``
runs (the same library functions, hence the same files in ``out_dir``) and returns a typed result.

- **Options** have the command line's names in snake_case (``--seq-len`` → ``seq_len``) and its defaults, except
  ``out_dir``; list options (``seeds``, ``controls``, ``include``, ``exclude``, ``metrics``) take a Python list or
  the command line's comma-separated text. An unknown option is a one-line :class:`~esa.errors.EsaError`.
- **A model already in memory**: ``model=<PreTrainedModel>, tokenizer=<tokenizer>`` instead of a name (baseline,
  profile, perturb, superweights, validate). esa evaluates it where it is, in its dtype; while the call runs, the
  model is in eval mode with ``requires_grad`` off except on the tensors being scored, and metrics that need a
  second derivative switch it to eager attention; its training mode and ``requires_grad`` flags are restored on
  return (the attention implementation is not). ``dtype``, ``device``, ``revision``, ``trust_remote_code`` and
  ``attn_implementation`` then do not apply and must stay at their defaults.
- **Files**: with ``out_dir`` the run directory is written exactly as the command writes it (a finished run there is
  replaced only with ``overwrite=True``). Without it the run is made in a temporary directory that is deleted
  before the function returns: the result holds what was read back from it, and its ``out_dir`` is None.
- **Results** are dataclasses holding the run's files read back (``metrics.json`` as ``metrics``, CSV tables as
  lists of dicts with string values, as in the file); ``profile(..., return_scores=True)`` adds every score
  (``{tensor name: float32 tensor}``, the contents of ``scores.safetensors``).

``esa.run`` (the runbook), ``esa.report``, ``esa.compare`` and ``esa.plan`` take model names and run directories,
as their commands do.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from esa.config import DataConfig, ModelConfig, needs_double_backward
from esa.errors import EsaError
from esa.options import COMMANDS as SPECS
from esa.runio import MANIFEST, read_csv_rows, read_json, read_jsonl

# ----------------------------------------------------------------------------------------------- options
#: Each function's keyword arguments and defaults: its command's options (esa.options), no files by default.
OPTIONS: dict[str, dict[str, Any]] = {name: SPECS[name].api_defaults() for name in
                                      ("baseline", "profile", "perturb", "superweights", "validate", "run", "plan",
                                       "report", "compare")}
# Options of a function that the command line does not have.
EXTRA_OPTIONS: dict[str, dict[str, Any]] = {
    "baseline": {"tokenizer": None}, "profile": {"tokenizer": None, "return_scores": False},
    "perturb": {"tokenizer": None}, "superweights": {"tokenizer": None}, "validate": {"tokenizer": None},
}


def options(command: str, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` completed with ``command``'s defaults; an unknown name is a one-line error with a suggestion."""
    known = {**OPTIONS[command], **EXTRA_OPTIONS.get(command, {})}
    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the options are {', '.join(sorted(known))}"
            raise EsaError(f"esa.{command}() has no option {name!r}{hint}")
    return {**known, **given}


def _config(command: str, o: dict[str, Any], where: Path | None = None) -> Any:
    """The configuration ``esa <command>`` would build from the same options (:meth:`esa.options.Command.config`),
    writing into ``where`` (a model object stands in for no name: :func:`_in_memory` describes it)."""
    spec = SPECS[command]
    values = {**o, "model": o["model"] if _is_name(o.get("model")) else None}
    values["out_dir"] = str(where) if where is not None else spec.defaults()["out_dir"]  # esa plan: no files
    return spec.config(values)


def _in_memory(config: Any, session: Any) -> Any:
    """``config`` as run on the model in memory (``session``; None: a model by name, ``config`` itself)."""
    return config if session is None else replace(config, model=_memory_model(session))


# ----------------------------------------------------------------------------------------------- results
@dataclass
class Run:
    """What every run directory holds: its resolved configuration and manifest (``out_dir`` None: deleted)."""

    out_dir: Path | None
    config: dict
    manifest: dict


@dataclass
class BaselineResult(Run):
    metrics: dict  # metrics.json: ppl, mean_nll, accuracy, tokens, leak flags
    window_nll: list[dict]  # window_nll.csv

    @property
    def ppl(self) -> float:
        return self.metrics["ppl"]


@dataclass
class ProfileResult(Run):
    metrics: dict  # metrics.json
    top: list[dict]  # top_weights.csv: rank, tensor, layer, component, expert, row, col, flat_index, score, weight
    bottom: list[dict]  # bottom_weights.csv
    statistics: dict  # score_stats.json: model, components, tensors
    tensor_stats: list[dict]  # tensor_stats.csv
    locations: list[dict]  # locations.csv
    stability: dict | None  # stability.json with stability_check
    scores: dict | None = None  # {tensor: float32 tensor} with return_scores


@dataclass
class PerturbResult(Run):
    results: dict  # results.json: conditions, tests, effect ratio
    trials: list[dict]  # trials.jsonl


@dataclass
class SuperweightsResult(Run):
    metrics: dict  # metrics.json
    found: list[dict]  # superweights.csv
    layers: list[dict]  # layers.csv


@dataclass
class ValidateResult(Run):
    summary: dict  # validate.json
    rows: list[dict]  # validate.csv


@dataclass
class ReportResult:
    out_dir: Path | None
    summary: dict  # report.json: runs, skipped, comparison, checklist counts, figures
    checklist: dict  # checklist.json
    markdown: str  # report.md


@dataclass
class CompareResult:
    out_dir: Path | None
    result: dict  # compare.json: labels, pairs, overlap_at_k / jaccard / spearman matrices


@dataclass
class RunbookResult:
    out_dir: Path | None
    baseline: BaselineResult | None = None
    profile: ProfileResult | None = None
    perturb: PerturbResult | None = None
    report: ReportResult | None = None


@dataclass
class PlanResult:
    fits: bool
    plan: dict  # the plan as ``esa plan --json`` prints it
    lines: list[str] = field(default_factory=list)  # as ``esa plan`` prints it


def _read_run(run_dir: Path, out_dir: Path | None) -> dict:
    return {"out_dir": out_dir, "config": read_json(run_dir / "config.json"), "manifest": read_json(run_dir / MANIFEST)}


def _csv(path: Path) -> list[dict]:
    return read_csv_rows(path) if path.is_file() else []


def read_baseline(run_dir: Path, out_dir: Path | None = None) -> BaselineResult:
    return BaselineResult(**_read_run(run_dir, out_dir), metrics=read_json(run_dir / "metrics.json"),
                          window_nll=_csv(run_dir / "window_nll.csv"))


def read_profile(run_dir: Path, out_dir: Path | None = None, *, scores: bool = False) -> ProfileResult:
    stability = run_dir / "stability.json"
    loaded = None
    if scores:
        from safetensors.torch import load_file

        loaded = load_file(str(run_dir / "scores.safetensors"))
    return ProfileResult(**_read_run(run_dir, out_dir), metrics=read_json(run_dir / "metrics.json"),
                         top=_csv(run_dir / "top_weights.csv"), bottom=_csv(run_dir / "bottom_weights.csv"),
                         statistics=read_json(run_dir / "score_stats.json"),
                         tensor_stats=_csv(run_dir / "tensor_stats.csv"), locations=_csv(run_dir / "locations.csv"),
                         stability=read_json(stability) if stability.is_file() else None, scores=loaded)


def read_perturb(run_dir: Path, out_dir: Path | None = None) -> PerturbResult:
    return PerturbResult(**_read_run(run_dir, out_dir), results=read_json(run_dir / "results.json"),
                         trials=read_jsonl(run_dir / "trials.jsonl"))


def read_superweights(run_dir: Path, out_dir: Path | None = None) -> SuperweightsResult:
    return SuperweightsResult(**_read_run(run_dir, out_dir), metrics=read_json(run_dir / "metrics.json"),
                              found=_csv(run_dir / "superweights.csv"), layers=_csv(run_dir / "layers.csv"))


def read_validate(run_dir: Path, out_dir: Path | None = None) -> ValidateResult:
    return ValidateResult(**_read_run(run_dir, out_dir), summary=read_json(run_dir / "validate.json"),
                          rows=_csv(run_dir / "validate.csv"))


def read_report(report_dir: Path, out_dir: Path | None = None) -> ReportResult:
    return ReportResult(out_dir=out_dir, summary=read_json(report_dir / "report.json"),
                        checklist=read_json(report_dir / "checklist.json"),
                        markdown=(report_dir / "report.md").read_text(encoding="utf-8"))


@contextlib.contextmanager
def _run_dir(out_dir: Any) -> Iterator[tuple[Path, Path | None]]:
    """(where to write, what the result calls it): ``out_dir`` itself, or a temporary directory deleted on exit."""
    if out_dir is not None:
        yield Path(out_dir), Path(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="esa-") as tmp:
        yield Path(tmp) / "run", None


# ----------------------------------------------------------------------------------------------- loaded models
def _is_name(model: Any) -> bool:
    return model is None or isinstance(model, (str, Path))


@contextlib.contextmanager
def _session(command: str, o: dict[str, Any], data: DataConfig, *, eager: bool = False) -> Iterator[Any]:
    """None for a model given by name (the command loads it); else a session around the model in memory, whose
    training mode and ``requires_grad`` flags are restored on exit."""
    model, tokenizer = o["model"], o.get("tokenizer")
    if _is_name(model):
        if tokenizer is not None:
            raise EsaError(f"esa.{command}(): tokenizer= goes with a model object, not with a model name")
        yield None
        return
    import torch

    from esa.modeling import LoadedModel, set_attention
    from esa.session import session_for

    if not isinstance(model, torch.nn.Module):
        raise EsaError(f"esa.{command}(): model must be a name, a path or a loaded transformers model "
                       f"(got {type(model).__name__})")
    if tokenizer is None:
        raise EsaError(f"esa.{command}(): a model object needs its tokenizer too (tokenizer=...)")
    for name in ("dtype", "device", "revision", "trust_remote_code", "attn_implementation"):
        if name in OPTIONS[command] and o[name] != OPTIONS[command][name]:
            raise EsaError(f"esa.{command}(): {name}= does not apply to a model object (it is used as it is)")
    first = next(model.parameters())
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    loaded = LoadedModel(model=model, tokenizer=tokenizer,
                         model_id=getattr(config, "_name_or_path", "") or type(model).__name__, source="memory",
                         revision=None, dtype=first.dtype, device=first.device,
                         max_positions=int(positions) if positions else None)
    training, flags = model.training, {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    model.requires_grad_(False)
    if eager:
        set_attention(model, "eager")
    try:
        yield session_for(loaded, data)
    finally:
        model.train(training)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


# ----------------------------------------------------------------------------------------------- commands
def _run_command(command: str, o: dict[str, Any], run: Callable, read: Callable, *,
                 eager: Callable[[Any], bool] = lambda config: False, **read_options: Any) -> Any:
    """What every command on a model does from Python: build its configuration from the options ``o``, run it
    (``run(config, session=...)``) on the model by name or in memory (eager attention when ``eager(config)``), in
    ``o["out_dir"]`` or a temporary directory, and ``read`` the run directory back."""
    with _run_dir(o["out_dir"]) as (where, shown):
        config = _config(command, o, where)
        with _session(command, o, config.data, eager=eager(config)) as session:
            run(_in_memory(config, session), session=session)
        return read(where, shown, **read_options)


def _selection_needs_eager(config: Any) -> bool:
    return needs_double_backward(config.selection.metric)


def baseline(**kwargs: Any) -> BaselineResult:
    """``esa baseline``: perplexity, loss and next-token accuracy (see :mod:`esa.commands.baseline`)."""
    from esa.commands.baseline import run_baseline

    return _run_command("baseline", options("baseline", kwargs), run_baseline, read_baseline)


def profile(**kwargs: Any) -> ProfileResult:
    """``esa profile``: scores, top-k / bottom-k, statistics (see :mod:`esa.commands.profile`);
    ``return_scores=True`` adds every score."""
    from esa.commands.profile import run_profile

    o = options("profile", kwargs)
    o["save_scores"] = o["save_scores"] or o["return_scores"]  # the scores are read back from scores.safetensors
    return _run_command("profile", o, run_profile, read_profile, eager=_selection_needs_eager,
                        scores=o["return_scores"])


def perturb(**kwargs: Any) -> PerturbResult:
    """``esa perturb``: the causal test against random_k / bottom_k controls (see :mod:`esa.trials`)."""
    from esa.commands.perturb import run_perturb

    return _run_command("perturb", options("perturb", kwargs), run_perturb, read_perturb,
                        eager=_selection_needs_eager)


def superweights(**kwargs: Any) -> SuperweightsResult:
    """``esa superweights``: super weights from activation spikes (see :mod:`esa.superweight_detection`)."""
    from esa.commands.superweights import run_superweights

    return _run_command("superweights", options("superweights", kwargs), run_superweights, read_superweights)


def validate(**kwargs: Any) -> ValidateResult:
    """``esa validate``: exact single-weight ablations against every metric (see :mod:`esa.metric_validation`)."""
    from esa.commands.validate import run_validate

    return _run_command("validate", options("validate", kwargs), run_validate, read_validate,
                        eager=lambda config: any(needs_double_backward(m)
                                                 for m in (config.metrics or ["hutchinson_diag"])))


def report(run_dirs: Any = None, **kwargs: Any) -> ReportResult:
    """``esa report RUN_DIRS --out OUT``: figures, tables and the evidence checklist from finished runs."""
    from esa.commands.report import run_report

    o = options("report", {"run_dirs": run_dirs, **kwargs})
    dirs = _run_dirs("report", o["run_dirs"], 1)
    with _run_dir(o["out"]) as (where, shown):
        run_report(dirs, SPECS["report"].config({**o, "out": str(where)}))
        return read_report(where, shown)


def compare(run_dirs: Any = None, **kwargs: Any) -> CompareResult:
    """``esa compare RUN_DIRS [--out OUT]``: top-k agreement between profile runs (files only with ``out``)."""
    from esa.commands.compare import run_compare

    o = options("compare", {"run_dirs": run_dirs, **kwargs})
    result = run_compare(_run_dirs("compare", o["run_dirs"], 2), o["out"])
    if o["out"] is not None:
        return CompareResult(out_dir=Path(o["out"]), result=read_json(Path(o["out"]) / "compare.json"))
    return CompareResult(out_dir=None, result=result)


def run(**kwargs: Any) -> RunbookResult:
    """``esa run``: baseline → profile → perturb (with ``perturb=``) → report, in sub-directories of ``out_dir``."""
    from esa.commands.run import run_runbook

    o = options("run", kwargs)
    with _run_dir(o["out_dir"]) as (where, shown):
        config = _config("run", o, where)
        run_runbook(config, announce=lambda line: None)
        sub = (lambda name: None) if shown is None else (lambda name: shown / name)
        return RunbookResult(
            out_dir=shown, baseline=read_baseline(where / "baseline", sub("baseline")),
            profile=read_profile(where / "profile", sub("profile")),
            perturb=read_perturb(where / "perturb", sub("perturb")) if config.perturb else None,
            report=read_report(where / "report", sub("report")))


def plan(**kwargs: Any) -> PlanResult:
    """``esa plan``: predicted peak device memory per phase (``device_memory``: e.g. "80GB"; default: this GPU)."""
    from esa.commands.plan import run_plan

    o = options("plan", kwargs)
    planned = run_plan(_config("plan", o), command=o["command"], device_memory=o["device_memory"],
                       flag="device_memory")
    return PlanResult(fits=planned.fits, plan=planned.plan, lines=planned.lines)


def _memory_model(session: Any) -> ModelConfig:
    """config.json's model section for a model passed in memory: its name (``config._name_or_path``, else its
    class), dtype and device as found."""
    loaded = session.loaded
    return ModelConfig(model=loaded.model_id, dtype=str(loaded.dtype).removeprefix("torch."), device=str(loaded.device))


def _run_dirs(command: str, value: Any, least: int) -> list[Path]:
    dirs = [value] if isinstance(value, (str, Path)) else list(value or [])
    if len(dirs) < least:
        raise EsaError(f"esa.{command}() needs at least {least} run director{'y' if least == 1 else 'ies'} "
                       "(run_dirs=[...])")
    return [Path(d) for d in dirs]


def _signature(command: str, fn: Callable) -> inspect.Signature:
    """The signature a notebook shows for ``fn``: its positional arguments (run directories), then its options and
    their defaults as keyword-only parameters."""
    arguments = SPECS[command].arguments
    params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD if name in arguments else
                                inspect.Parameter.KEYWORD_ONLY, default=default)
              for name, default in {**OPTIONS[command], **EXTRA_OPTIONS.get(command, {})}.items()]
    return inspect.Signature(params, return_annotation=inspect.signature(fn).return_annotation)


for _name, _fn in {"baseline": baseline, "profile": profile, "perturb": perturb, "superweights": superweights,
                   "validate": validate, "run": run, "plan": plan, "report": report, "compare": compare}.items():
    _fn.__signature__ = _signature(_name, _fn)  # type: ignore[attr-defined]

COMMANDS = ("baseline", "profile", "perturb", "report", "run", "plan", "superweights", "validate", "compare")
