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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from esa.config import (BaselineConfig, DataConfig, ModelConfig, PerturbConfig, ProfileConfig, SelectionConfig,
                        SuperweightsConfig, ValidateConfig, needs_double_backward)
from esa.errors import EsaError
from esa.runio import MANIFEST, read_csv_rows, read_json, read_jsonl

# ----------------------------------------------------------------------------------------------- options
MODEL_OPTIONS = {"model": None, "dtype": "auto", "device": "auto", "device_map": None, "max_memory": None,
                 "revision": None, "trust_remote_code": False, "attn_implementation": None}
DATA_OPTIONS = {"dataset": "embedded", "dataset_path": None, "text_file": None, "seq_len": None, "max_samples": None,
                "batch_size": None, "seed": 0}
SELECTION_OPTIONS = {"metric": "grad_x_weight", "mode": "per_layer", "topk": 100, "include": None, "exclude": None,
                     "include_biases": False, "include_norms": False, "hutchinson_probes": 8, "hessian_budget": 4096,
                     "bottom_k_include_unused": False, "score_groups": None}
PERTURBATION_OPTIONS = {"perturb": "zero", "perturb_scale": 1.0, "perturb_prob": 1.0, "bits": "any",
                        "controls": "random_k,bottom_k", "stratified": True, "control_sets": 39, "n_bootstrap": 10_000}
STABILITY_OPTIONS = {"seeds": "0,1,2", "stability_check": False, "stability_fraction": 0.5}
OUTPUT_OPTIONS = {"out_dir": None, "overwrite": False}
#: ``esa run`` (and ``esa plan``): every option of the phases it runs (cli/options.py's RUN group).
RUN_OPTIONS = {**MODEL_OPTIONS, **DATA_OPTIONS, "dataset": "auto", **SELECTION_OPTIONS, **PERTURBATION_OPTIONS,
               "perturb": None, **STABILITY_OPTIONS, "save_scores": False, "save_plots": False, **OUTPUT_OPTIONS}

OPTIONS: dict[str, dict[str, Any]] = {
    "baseline": {**MODEL_OPTIONS, **DATA_OPTIONS, **OUTPUT_OPTIONS},
    "profile": {**MODEL_OPTIONS, **DATA_OPTIONS, **SELECTION_OPTIONS, **STABILITY_OPTIONS, "save_scores": False,
                "save_plots": False, **OUTPUT_OPTIONS},
    "perturb": {**MODEL_OPTIONS, **DATA_OPTIONS, **SELECTION_OPTIONS, **PERTURBATION_OPTIONS, "from_profile": None,
                "weights": None, **STABILITY_OPTIONS, "save_plots": False, **OUTPUT_OPTIONS},
    "superweights": {**MODEL_OPTIONS, **DATA_OPTIONS, "prompt": "Apple Inc. is a worldwide tech company.",
                     "threshold": 50.0, "relative_threshold": 10.0, "iterate": False, "max_iterations": 10,
                     "from_profile": None, "mediation": False, **OUTPUT_OPTIONS},
    "validate": {**MODEL_OPTIONS, **DATA_OPTIONS, "metrics": "", "sample": 2000, "topk": 20, "perturb": "zero",
                 "n_bootstrap": 1000, "include": None, "exclude": None, "include_biases": False,
                 "include_norms": False, "hutchinson_probes": 8, "hessian_budget": 4096, **OUTPUT_OPTIONS},
    "run": RUN_OPTIONS,
    "report": {"run_dirs": None, "out": None, "overwrite": False},
    "compare": {"run_dirs": None, "out": None},
    "plan": {"command": "run", "device_memory": None, **RUN_OPTIONS},
}
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


def _text_list(value: Any, name: str) -> list[str]:
    """A list option given as a list, a tuple or the command line's comma-separated text."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise EsaError(f"{name} must be a list or comma-separated text (got {type(value).__name__})")


def _seeds(value: Any) -> list[int]:
    """``seeds`` as the command line checks them: integers, at least one, none repeated."""
    try:
        seeds = [int(s) for s in _text_list(value, "seeds")]
    except ValueError:
        raise EsaError(f"seeds {value!r}: use integers, e.g. [0, 1, 2] or '0,1,2'") from None
    if not seeds:
        raise EsaError("seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise EsaError(f"seeds {value!r} repeats a seed")
    return seeds


def _controls(value: Any) -> list[str]:
    names = _text_list(value, "controls")
    return [] if [n.lower() for n in names] in ([], ["none"]) else names


def _path(value: Any) -> str | None:
    return None if value is None else str(value)


def model_config(o: dict[str, Any]) -> ModelConfig:
    max_memory = o.get("max_memory")
    if isinstance(max_memory, (list, tuple)):  # as --max-memory repeated: one comma-separated string
        max_memory = ",".join(map(str, max_memory))
    return ModelConfig(model=_path(o["model"]), dtype=o["dtype"], device=o["device"], revision=o["revision"],
                       trust_remote_code=o["trust_remote_code"], attn_implementation=o["attn_implementation"],
                       device_map=_path(o.get("device_map")), max_memory=max_memory)


def data_config(o: dict[str, Any]) -> DataConfig:
    return DataConfig(dataset=o["dataset"], dataset_path=_path(o["dataset_path"]), text_file=_path(o["text_file"]),
                      seq_len=o["seq_len"], max_samples=o["max_samples"], batch_size=o["batch_size"], seed=o["seed"])


def selection_config(o: dict[str, Any], **override: Any) -> SelectionConfig:
    values = {k: o.get(k, v) for k, v in SELECTION_OPTIONS.items()} | override
    return SelectionConfig(**{**values, "include": _text_list(values["include"], "include"),
                              "exclude": _text_list(values["exclude"], "exclude")})


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
def baseline(**kwargs: Any) -> BaselineResult:
    """``esa baseline``: perplexity, loss and next-token accuracy (see :mod:`esa.baseline`)."""
    from esa.baseline import run_baseline

    o = options("baseline", kwargs)
    data = data_config(o)
    with _run_dir(o["out_dir"]) as (where, shown), _session("baseline", o, data) as session:
        config = BaselineConfig(model=model_config(o) if session is None else _memory_model(session),
                                data=data, out_dir=str(where), overwrite=o["overwrite"])
        run_baseline(config, session=session)
        return read_baseline(where, shown)


def profile(**kwargs: Any) -> ProfileResult:
    """``esa profile``: scores, top-k / bottom-k, statistics (see :mod:`esa.profile`); ``return_scores=True`` adds
    every score."""
    from esa.profile import run_profile

    o = options("profile", kwargs)
    data = data_config(o)
    with _run_dir(o["out_dir"]) as (where, shown), \
            _session("profile", o, data, eager=needs_double_backward(o["metric"])) as session:
        config = ProfileConfig(model=model_config(o) if session is None else _memory_model(session), data=data,
                               selection=selection_config(o), seeds=_seeds(o["seeds"]),
                               stability_check=o["stability_check"], stability_fraction=o["stability_fraction"],
                               save_scores=o["save_scores"] or o["return_scores"], save_plots=o["save_plots"],
                               out_dir=str(where), overwrite=o["overwrite"])
        run_profile(config, session=session)
        return read_profile(where, shown, scores=o["return_scores"])


def perturb(**kwargs: Any) -> PerturbResult:
    """``esa perturb``: the causal test against random_k / bottom_k controls (see :mod:`esa.trials`)."""
    from esa.trials import run_perturb

    o = options("perturb", kwargs)
    data = data_config(o)
    with _run_dir(o["out_dir"]) as (where, shown), \
            _session("perturb", o, data, eager=needs_double_backward(o["metric"])) as session:
        config = PerturbConfig(
            model=model_config(o) if session is None else _memory_model(session), data=data,
            selection=selection_config(o),
            perturb=o["perturb"], perturb_scale=o["perturb_scale"], perturb_prob=o["perturb_prob"], bits=o["bits"],
            controls=_controls(o["controls"]), seeds=_seeds(o["seeds"]), from_profile=_path(o["from_profile"]),
            weights_file=_path(o["weights"]), stability_check=o["stability_check"],
            stability_fraction=o["stability_fraction"], random_stratified=o["stratified"],
            control_sets=o["control_sets"], n_bootstrap=o["n_bootstrap"], save_plots=o["save_plots"],
            out_dir=str(where), overwrite=o["overwrite"])
        run_perturb(config, session=session)
        return read_perturb(where, shown)


def superweights(**kwargs: Any) -> SuperweightsResult:
    """``esa superweights``: super weights from activation spikes (see :mod:`esa.superweights`)."""
    from esa.superweights import run_superweights

    o = options("superweights", kwargs)
    data = data_config(o)
    with _run_dir(o["out_dir"]) as (where, shown), _session("superweights", o, data) as session:
        config = SuperweightsConfig(
            model=model_config(o) if session is None else _memory_model(session), data=data, prompt=o["prompt"],
            threshold=o["threshold"], relative_threshold=o["relative_threshold"], iterate=o["iterate"],
            max_iterations=o["max_iterations"], from_profile=_path(o["from_profile"]), mediation=o["mediation"],
            out_dir=str(where), overwrite=o["overwrite"])
        run_superweights(config, session=session)
        return read_superweights(where, shown)


def validate(**kwargs: Any) -> ValidateResult:
    """``esa validate``: exact single-weight ablations against every metric (see :mod:`esa.validate`)."""
    from esa.validate import run_validate

    o = options("validate", kwargs)
    data = data_config(o)
    metrics = _text_list(o["metrics"], "metrics")
    second_order = any(needs_double_backward(m) for m in (metrics or ["hutchinson_diag"]))
    with _run_dir(o["out_dir"]) as (where, shown), \
            _session("validate", o, data, eager=second_order) as session:
        config = ValidateConfig(
            model=model_config(o) if session is None else _memory_model(session), data=data,
            selection=selection_config(o, metric="magnitude", mode="global", topk=o["topk"]), metrics=metrics,
            sample=o["sample"], topk=o["topk"], perturb=o["perturb"], n_bootstrap=o["n_bootstrap"],
            out_dir=str(where), overwrite=o["overwrite"])
        run_validate(config, session=session)
        return read_validate(where, shown)


def report(run_dirs: Any = None, **kwargs: Any) -> ReportResult:
    """``esa report RUN_DIRS --out OUT``: figures, tables and the evidence checklist from finished runs."""
    from esa.report import write_report

    o = options("report", {"run_dirs": run_dirs, **kwargs})
    dirs = _run_dirs("report", o["run_dirs"], 1)
    with _run_dir(o["out"]) as (where, shown):
        write_report(dirs, where, overwrite=o["overwrite"])
        return read_report(where, shown)


def compare(run_dirs: Any = None, **kwargs: Any) -> CompareResult:
    """``esa compare RUN_DIRS [--out OUT]``: top-k agreement between profile runs (files only with ``out``)."""
    from esa.compare import compare_runs, write_comparison

    o = options("compare", {"run_dirs": run_dirs, **kwargs})
    result = compare_runs(_run_dirs("compare", o["run_dirs"], 2))
    if o["out"] is not None:
        write_comparison(result, Path(o["out"]))
        return CompareResult(out_dir=Path(o["out"]), result=read_json(Path(o["out"]) / "compare.json"))
    return CompareResult(out_dir=None, result=result)


def run(**kwargs: Any) -> RunbookResult:
    """``esa run``: baseline → profile → perturb (with ``perturb=``) → report, in sub-directories of ``out_dir``."""
    from esa.runbook import RunbookConfig, resolve_dataset, run_runbook

    o = options("run", kwargs)
    with _run_dir(o["out_dir"]) as (where, shown):
        dataset = resolve_dataset(o["dataset"], o["model"], _path(o["text_file"]))
        o = {**o, "dataset": dataset}
        config = RunbookConfig(
            model=model_config(o), data=data_config(o), selection=selection_config(o),
            perturb=o["perturb"], perturb_scale=o["perturb_scale"], perturb_prob=o["perturb_prob"], bits=o["bits"],
            controls=_controls(o["controls"]), random_stratified=o["stratified"], control_sets=o["control_sets"],
            n_bootstrap=o["n_bootstrap"], seeds=_seeds(o["seeds"]), stability_check=o["stability_check"],
            stability_fraction=o["stability_fraction"], save_scores=o["save_scores"], save_plots=o["save_plots"],
            out_dir=str(where), overwrite=o["overwrite"])
        run_runbook(config, announce=lambda line: None)
        sub = (lambda name: None) if shown is None else (lambda name: shown / name)
        return RunbookResult(
            out_dir=shown, baseline=read_baseline(where / "baseline", sub("baseline")),
            profile=read_profile(where / "profile", sub("profile")),
            perturb=read_perturb(where / "perturb", sub("perturb")) if o["perturb"] else None,
            report=read_report(where / "report", sub("report")))


def plan(**kwargs: Any) -> PlanResult:
    """``esa plan``: predicted peak device memory per phase (``device_memory``: e.g. "80GB"; default: this GPU)."""
    from esa.plan import format_plan, parse_size, plan_command

    o = options("plan", kwargs)
    memory = o["device_memory"]
    if memory is None:
        import torch

        if not torch.cuda.is_available():
            raise EsaError("no GPU here: give device_memory, e.g. device_memory='80GB'")
        memory = str(torch.cuda.get_device_properties(0).total_memory)
    controls = _controls(o["controls"])
    result, _, _ = plan_command(
        model_config({**o, "device": "cuda", "attn_implementation": None}),
        selection_config(o), command=o["command"], seq_len=o["seq_len"], max_samples=o["max_samples"],
        batch_size=o["batch_size"], perturb=o["perturb"] is not None, bottom_k="bottom_k" in controls,
        control_sets=o["control_sets"] if "random_k" in controls else 0, seeds=len(_seeds(o["seeds"])),
        stability_check=o["stability_check"], stability_fraction=o["stability_fraction"],
        device_memory=parse_size(str(memory)))
    return PlanResult(fits=result.fits, plan=result.as_dict(), lines=list(format_plan(result)))


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
    """The keyword-only signature a notebook shows for ``fn`` (its options and their defaults)."""
    params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
              for name, default in {**OPTIONS[command], **EXTRA_OPTIONS.get(command, {})}.items()]
    return inspect.Signature(params, return_annotation=inspect.signature(fn).return_annotation)


for _name, _fn in {"baseline": baseline, "profile": profile, "perturb": perturb, "superweights": superweights,
                   "validate": validate, "run": run, "plan": plan}.items():
    _fn.__signature__ = _signature(_name, _fn)  # type: ignore[attr-defined]

COMMANDS = ("baseline", "profile", "perturb", "report", "run", "plan", "superweights", "validate", "compare")
