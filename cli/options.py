"""Every option of the ``esa`` commands, declared once: name, type, help, panel, and where its value goes.

An option is an :class:`Opt`: the dotted path of the configuration field it sets (``"data.seq_len"``), its
type, help and help panel. Its default is read from the command's configuration dataclass (esa/config.py), so
a default is written once, there. Options come in groups (``MODEL``, ``DATA``, ``SELECTION`` ...); a command
takes groups with :func:`takes`, which gives it one parameter per option and calls it with the configuration
built from them (``config=ProfileConfig(...)``). ``esa run`` takes the groups of every phase it runs, so it
accepts every option of ``esa baseline``, ``esa profile``, ``esa perturb`` and ``esa report`` but the few that
only make sense for one phase (``PHASE_ONLY``).

To add an option:

1. give the configuration a field with its default (esa/config.py) and check its value in
   ``esa.config.validate``;
2. declare it here, e.g. ``DEVICE_MAP = Opt("model.device_map", Optional[str], "help ...", MODEL_DATA)``;
3. add it to the group whose commands take it (``MODEL`` → baseline, profile, perturb, run, superweights,
   validate, plan); a command with a field of its own takes a group of its own (see ``DETECTION``).

A flag (type ``bool``) is ``--name/--no-name``. An option whose value differs in form from the field
(``--seeds 0,1,2`` → ``[0, 1, 2]``) gives ``to_config`` (and ``to_cli`` for the default shown in help).
Options of a single command that no configuration holds (``esa plan --json``) are declared here too, as
``Annotated`` types (:meth:`Opt.annotated`), and written as ordinary parameters of the command.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Optional

import typer

from esa.errors import EsaError

MODEL_DATA = "Model and data"
SELECTION_PANEL = "Metric and selection"
SEEDS_PANEL = "Seeds and stability"
PERTURBATION = "Perturbation"
OUTPUT = "Output"
DETECTION = "Detection"
VALIDATION = "Validation"
PLANNING = "Planning"

_FROM_CONFIG = object()  # the default is the configuration's (the usual case)


@dataclass(frozen=True)
class Opt:
    """One command-line option; ``path`` names the configuration field it sets (dots for nested ones)."""

    path: str
    type: Any
    help: str
    panel: str | None
    flags: tuple[str, ...] = ()  # default: --<field name with dashes> (--name/--no-name for a bool)
    name: str = ""  # the command's parameter name; default: the field name
    default: Any = _FROM_CONFIG
    to_config: Callable[[Any], Any] | None = None  # command-line value → field value
    to_cli: Callable[[Any], Any] | None = None  # field value → command-line default

    @property
    def param(self) -> str:
        return self.name or self.path.rsplit(".", 1)[-1]

    @property
    def decls(self) -> tuple[str, ...]:
        if self.flags:
            return self.flags
        flag = "--" + self.param.replace("_", "-")
        return (f"{flag}/--no-{flag[2:]}",) if self.type is bool else (flag,)

    @property
    def long_flags(self) -> list[str]:
        """Every ``--name`` this option answers to (both halves of ``--x/--no-x``)."""
        return [f for d in self.decls for f in d.split("/") if f.startswith("--")]

    def but(self, **changes: Any) -> Opt:
        """A variant for one command (another help text or default), still this option."""
        return dataclasses.replace(self, **changes)

    def option(self) -> Any:
        return typer.Option(*self.decls, help=self.help, rich_help_panel=self.panel)

    def annotated(self) -> Any:
        """``Annotated[type, typer.Option(...)]``, for a parameter written out in a command."""
        return Annotated[self.type, self.option()]

    def cli_default(self, config: Any) -> Any:
        if self.default is not _FROM_CONFIG:
            return self.default
        value = config
        for part in self.path.split("."):
            value = getattr(value, part)
        return self.to_cli(value) if self.to_cli else value


# ----------------------------------------------------------------------------------------------- conversions
def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]`` (their checks: :func:`esa.config.validate_seeds`)."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise EsaError(f"--seeds {text!r}: use comma-separated integers like 0,1,2") from None


def parse_controls(text: str) -> list[str]:
    if text.strip().lower() in ("", "none"):
        return []
    return [c.strip() for c in text.split(",") if c.strip()]


def parse_names(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _joined(values: list) -> str:
    return ",".join(map(str, values))


def _path_or_none(value: Path | None) -> str | None:
    return None if value is None else str(value)


def _to_path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _list(values: list[str] | None) -> list[str]:
    return list(values or [])


def _list_or_none(values: list[str]) -> list[str] | None:
    return list(values) or None


# ----------------------------------------------------------------------------------------------- model and data
MODEL = Opt("model.model", Optional[str], "Hugging Face hub id or local model directory (default: the embedded "
            "tiny model)", MODEL_DATA, flags=("--model", "-m"))
DTYPE = Opt("model.dtype", str, "auto | float32 | bfloat16 | float16 (auto: float32 on CPU, the checkpoint's "
            "bf16/fp16 on CUDA)", MODEL_DATA)
DEVICE = Opt("model.device", str, "auto | cpu | cuda | cuda:N | mps", MODEL_DATA)
REVISION = Opt("model.revision", Optional[str], "hub revision (branch, tag or commit)", MODEL_DATA)
TRUST_REMOTE_CODE = Opt("model.trust_remote_code", bool, "allow model code from the hub", MODEL_DATA)
DEVICE_MAP = Opt("model.device_map", Optional[str], "split the model across devices with accelerate: auto | "
                 "balanced | sequential | FILE.json (module name → device) (default: the whole model on --device)",
                 MODEL_DATA)
MAX_MEMORY = Opt("model.max_memory", Optional[list[str]], "memory per device for --device-map, e.g. 0=70GiB "
                 "(repeatable) or 0=70GiB,1=70GiB,cpu=200GiB", MODEL_DATA,
                 to_config=lambda values: ",".join(values) if values else None,
                 to_cli=lambda joined: joined.split(",") if joined else None)
ATTN_IMPLEMENTATION = Opt("model.attn_implementation", Optional[str], "eager | sdpa | flash_attention_2 ... "
                          "(default: the model's; eager for second-order metrics)", MODEL_DATA)

DATASET = Opt("data.dataset", str, "embedded (held-out Python docs) | wikitext2 (raw test split)", MODEL_DATA)
DATASET_PATH = Opt("data.dataset_path", Optional[Path], "directory holding wiki.test.raw for --dataset wikitext2",
                   MODEL_DATA, to_config=_path_or_none, to_cli=_to_path)
TEXT_FILE = Opt("data.text_file", Optional[Path], "evaluate on this plain UTF-8 text file instead", MODEL_DATA,
                to_config=_path_or_none, to_cli=_to_path)
SEQ_LEN = Opt("data.seq_len", Optional[int], "tokens per window (default: min(2048, model context))", MODEL_DATA)
MAX_SAMPLES = Opt("data.max_samples", Optional[int], "number of windows (a seeded subset) (default: all)",
                  MODEL_DATA)
BATCH_SIZE = Opt("data.batch_size", Optional[int], "windows per forward pass (default: the largest that fits the "
                 "device by the plan; 8 on CPU)", MODEL_DATA)
SEED = Opt("data.seed", int, "seed of the window subset", MODEL_DATA)

# ----------------------------------------------------------------------------------------------- selection
METRIC = Opt("selection.metric", str, "grad_x_weight | grad_squared | hessian_diag | hutchinson_diag | magnitude | "
             "act_mag | taylor | obd (signed estimates of the loss change of zeroing a weight, ranked by |value|)",
             SELECTION_PANEL)
MODE = Opt("selection.mode", str, "per_layer (top-k in every tensor) | global (top-k over the whole model)",
           SELECTION_PANEL)
TOPK = Opt("selection.topk", int, "weights selected (per tensor in per_layer mode)", SELECTION_PANEL,
           flags=("--topk", "-k"))
INCLUDE = Opt("selection.include", Optional[list[str]], "score only tensors matching this glob (repeatable), e.g. "
              "'*layers.1.mlp.*'", SELECTION_PANEL, to_config=_list, to_cli=_list_or_none)
EXCLUDE = Opt("selection.exclude", Optional[list[str]], "skip tensors matching this glob (repeatable)",
              SELECTION_PANEL, to_config=_list, to_cli=_list_or_none)
INCLUDE_BIASES = Opt("selection.include_biases", bool, "score bias vectors too", SELECTION_PANEL)
INCLUDE_NORMS = Opt("selection.include_norms", bool, "score normalisation scales too", SELECTION_PANEL)
HUTCHINSON_PROBES = Opt("selection.hutchinson_probes", int, "Rademacher probes per batch for hutchinson_diag",
                        SELECTION_PANEL)
HESSIAN_BUDGET = Opt("selection.hessian_budget", int, "most weights hessian_diag may score exactly (one "
                     "Hessian-vector product each)", SELECTION_PANEL)
BOTTOM_K_INCLUDE_UNUSED = Opt(
    "selection.bottom_k_include_unused", bool, "let bottom_k pick weights with a zero score (unused by the "
    "evaluation, e.g. embedding rows of tokens that never occur); by default they are left out and counted",
    SELECTION_PANEL)
SCORE_GROUPS = Opt("selection.score_groups", Optional[int], "score the tensors in N groups, one pass over the "
                   "windows each (same results, less memory) (default: from the plan)", SELECTION_PANEL)

SEEDS = Opt("seeds", str, "comma-separated seeds, e.g. 0,1,2", SEEDS_PANEL, to_config=parse_seeds, to_cli=_joined)
STABILITY_CHECK = Opt("stability_check", bool, "repeat the selection on a seeded subset of the windows per seed "
                      "and report top-k Jaccard", SEEDS_PANEL)
STABILITY_FRACTION = Opt("stability_fraction", float, "share of the windows each stability seed uses", SEEDS_PANEL)

# ----------------------------------------------------------------------------------------------- perturbation
PERTURB = Opt("perturb", str, "zero | sign_flip | gauss_noise | bit_flip", PERTURBATION)
PERTURB_SCALE = Opt("perturb_scale", float, "sign_flip: w ← -S·w; gauss_noise: w ← w + S·|w|·ε", PERTURBATION)
PERTURB_PROB = Opt("perturb_prob", float, "bit_flip: probability that a selected weight gets one bit flipped",
                   PERTURBATION)
BITS = Opt("bits", str, "bit_flip: any | sign | exponent | mantissa | positions like 14,13 (0 = least significant)",
           PERTURBATION)
CONTROLS = Opt("controls", str, "comma-separated controls: random_k, bottom_k (or 'none')", PERTURBATION,
               to_config=parse_controls, to_cli=lambda v: _joined(v) or "none")
STRATIFIED = Opt("random_stratified", bool, "random_k matches the top-k's per-tensor counts (default) or is "
                 "uniform over all scored weights", PERTURBATION, flags=("--stratified/--unstratified",),
                 name="stratified")
CONTROL_SETS = Opt("control_sets", int, "random_k control sets, each drawn from (--seed, set index) and evaluated "
                   "once; the super set is ranked against them, so the smallest p-value is 1/(1+N) (19 reach 0.05, "
                   "39 reach 0.025)", PERTURBATION)
N_BOOTSTRAP = Opt("n_bootstrap", int, "bootstrap resamples of the windows for confidence intervals", PERTURBATION)
FROM_PROFILE = Opt("from_profile", Optional[Path], "reuse the selection of this finished profile run",
                   PERTURBATION, to_config=_path_or_none, to_cli=_to_path)
WEIGHTS = Opt("weights_file", Optional[Path], "CSV of tensor,row,col[,expert] (or tensor,flat_index) to ablate "
              "jointly, or 'known': the model's published super weights", PERTURBATION, flags=("--weights",),
              name="weights", to_config=_path_or_none, to_cli=_to_path)

# ----------------------------------------------------------------------------------------------- output
OUT_DIR = Opt("out_dir", Path, "run directory for the results", OUTPUT, to_config=str, to_cli=Path)
OVERWRITE = Opt("overwrite", bool, "replace a finished run in --out-dir", OUTPUT)
SAVE_SCORES = Opt("save_scores", bool, "also write every score to scores.safetensors (4 bytes per scored weight)",
                  OUTPUT)
SAVE_PLOTS = Opt("save_plots", bool, "write figures (PNG and PDF) under plots/", OUTPUT)
REPORT_OUT = Opt("out", Path, "where to write report.html, report.md, tables.tex, figures/", OUTPUT,
                 to_config=str, to_cli=Path)

# ----------------------------------------------------------------------------------------------- superweights
PROMPT = Opt("prompt", str, "input when --max-samples is not given", DETECTION)
THRESHOLD = Opt("threshold", float, "a spike exceeds this |activation| (the paper's 50)", DETECTION)
RELATIVE_THRESHOLD = Opt("relative_threshold", float, "... and this multiple of the layer's median channel maximum",
                         DETECTION)
ITERATE = Opt("iterate", bool, "zero the found weights and look again until nothing new appears", DETECTION)
MAX_ITERATIONS = Opt("max_iterations", int, "passes of --iterate at most", DETECTION)
MEDIATION = Opt("mediation", bool, "PPL with the found weights zeroed, and zeroed with their super activations "
                "restored", DETECTION)

# ----------------------------------------------------------------------------------------------- validate
METRICS = Opt("metrics", str, "comma-separated metrics to test (default: all that fit; hessian_diag only within "
              "--hessian-budget)", VALIDATION, to_config=parse_names, to_cli=_joined)
SAMPLE = Opt("sample", int, "seeded random weights, stratified over tensors", VALIDATION)

def variant(group: Iterable[Opt], *replacements: Opt) -> tuple[Opt, ...]:
    """``group`` with each option that shares a parameter name with one of ``replacements`` replaced by it."""
    by_param = {r.param: r for r in replacements}
    return tuple(by_param.get(o.param, o) for o in group)


# ----------------------------------------------------------------------------------------------- groups
MODEL_OPTIONS = (MODEL, DTYPE, DEVICE, DEVICE_MAP, MAX_MEMORY, REVISION, TRUST_REMOTE_CODE, ATTN_IMPLEMENTATION)
DATA_OPTIONS = (DATASET, DATASET_PATH, TEXT_FILE, SEQ_LEN, MAX_SAMPLES, BATCH_SIZE, SEED)
TENSOR_CHOICE = (INCLUDE, EXCLUDE, INCLUDE_BIASES, INCLUDE_NORMS)
SELECTION = (METRIC, MODE, TOPK, *TENSOR_CHOICE, HUTCHINSON_PROBES, HESSIAN_BUDGET, BOTTOM_K_INCLUDE_UNUSED,
             SCORE_GROUPS)
SEED_OPTIONS = (SEEDS, STABILITY_CHECK, STABILITY_FRACTION)
PERTURBATION_OPTIONS = (PERTURB, PERTURB_SCALE, PERTURB_PROB, BITS, CONTROLS, STRATIFIED, CONTROL_SETS, N_BOOTSTRAP)
RUN_OUTPUT = (OUT_DIR, OVERWRITE)

BASELINE = (*MODEL_OPTIONS, *DATA_OPTIONS, *RUN_OUTPUT)
PROFILE = (*MODEL_OPTIONS, *DATA_OPTIONS, *SELECTION, *SEED_OPTIONS, SAVE_SCORES, SAVE_PLOTS, *RUN_OUTPUT)
PERTURB_COMMAND = (*MODEL_OPTIONS, *DATA_OPTIONS, *SELECTION, *PERTURBATION_OPTIONS, FROM_PROFILE, WEIGHTS,
                   *SEED_OPTIONS, SAVE_PLOTS, *RUN_OUTPUT)
REPORT = (REPORT_OUT, OVERWRITE.but(help="replace a report already in --out"))
SUPERWEIGHTS = (*MODEL_OPTIONS,
                *variant(DATA_OPTIONS, MAX_SAMPLES.but(help="detect on this many evaluation windows instead of the "
                                                       "prompt")),
                PROMPT, THRESHOLD, RELATIVE_THRESHOLD, ITERATE, MAX_ITERATIONS,
                FROM_PROFILE.but(help="rank of each found weight under this profile run's metric", panel=DETECTION),
                MEDIATION, *RUN_OUTPUT)
VALIDATE = (*MODEL_OPTIONS, *DATA_OPTIONS, METRICS, SAMPLE,
            TOPK.but(path="topk", help="plus each metric's global top-k", panel=VALIDATION),
            PERTURB.but(help="zero | sign_flip", panel=VALIDATION),
            N_BOOTSTRAP.but(help="bootstrap resamples of the sampled weights", panel=VALIDATION),
            *TENSOR_CHOICE, HUTCHINSON_PROBES, HESSIAN_BUDGET, *RUN_OUTPUT)
TENSORS = (MODEL, DTYPE, DEVICE.but(help="auto | cpu | cuda | mps"), REVISION, TRUST_REMOTE_CODE, *TENSOR_CHOICE)


#: ``esa run``: every option of the phases it runs. Only ``PHASE_ONLY`` is left out.
RUN = variant(
    (*MODEL_OPTIONS, *DATA_OPTIONS, *SELECTION, *PERTURBATION_OPTIONS, *SEED_OPTIONS, SAVE_SCORES, SAVE_PLOTS,
     *RUN_OUTPUT),
    DATASET.but(help="auto (embedded for the embedded model or with --text-file, else wikitext2) | embedded | "
                "wikitext2"),
    PERTURB.but(type=Optional[str], help="zero | sign_flip | gauss_noise | bit_flip (default: no perturbation "
                "phase)"),
)
#: Options of a phase command that ``esa run`` does not take: it chains the phases itself.
PHASE_ONLY = {"--from-profile": "perturb uses the run's own profile", "--weights": "perturb uses the run's own "
              "selection", "--out": "the report goes to --out-dir/report"}
#: ``esa plan``: a command line of any phase or of ``esa run`` can be planned as it is.
PLAN = RUN

# Options of one command that no configuration holds (written out as parameters of the command).
PLAN_COMMAND = Opt("command", str, "the command to plan: baseline | profile | perturb | run", PLANNING)
DEVICE_MEMORY = Opt("device_memory", Optional[str], "memory of the device to plan for, e.g. 80GB (default: this "
                    "machine's GPU)", PLANNING)
JSON = Opt("json", bool, "print the plan as JSON", PLANNING, flags=("--json/--no-json",), name="json_output")
TINY_STEPS = Opt("steps", int, "optimizer steps", None)
PlanCommand, DeviceMemory, Json = PLAN_COMMAND.annotated(), DEVICE_MEMORY.annotated(), JSON.annotated()
RunDirs = Annotated[list[Path], typer.Argument(help="two or more finished profile run directories")]
ReportRunDirs = Annotated[list[Path], typer.Argument(help="run directories, or folders of them (e.g. an esa run "
                                                     "out-dir)")]
CompareOut = REPORT_OUT.but(type=Optional[Path], help="write compare.json and overlap/jaccard/spearman CSVs here",
                            panel=None).annotated()
TinyOutDir = OUT_DIR.but(help="where to write the model (to replace the embedded one: esa/tiny/assets with "
                         "--overwrite)", panel=None).annotated()
TinySteps = TINY_STEPS.annotated()
TinySeed = SEED.but(help="seed of initialisation and batches", panel=None).annotated()
TinyOverwrite = OVERWRITE.but(help="replace the model in --out-dir", panel=None).annotated()


def version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("esa")
        except PackageNotFoundError:  # run from a checkout that is not installed
            number = "unknown (not installed)"
        typer.echo(f"esa {number}")
        raise typer.Exit()


Version = Annotated[bool, typer.Option("--version", help="print esa's version and exit", callback=version_callback,
                                       is_eager=True)]


# ----------------------------------------------------------------------------------------------- the mechanism
def _set(config: Any, path: str, value: Any) -> Any:
    """``config`` with the field at dotted ``path`` set to ``value`` (nested dataclasses are replaced too)."""
    head, _, rest = path.partition(".")
    if rest:
        value = _set(getattr(config, head), rest, value)
    return dataclasses.replace(config, **{head: value})


def build(config_type: type, options: Iterable[Opt], values: dict[str, Any]) -> Any:
    """The configuration the command line describes: ``config_type()`` with every option's field set."""
    config = config_type()
    for opt in options:
        value = values[opt.param]
        config = _set(config, opt.path, opt.to_config(value) if opt.to_config else value)
    return config


def check_unique(options: Iterable[Opt]) -> None:
    seen: dict[str, str] = {}
    for opt in options:
        for key in (opt.param, *opt.long_flags, *(f for f in opt.decls if not f.startswith("--"))):
            if key in seen:
                raise TypeError(f"option {key} is declared twice ({seen[key]} and {opt.path})")
            seen[key] = opt.path


def takes(config_type: type, options: Iterable[Opt]) -> Callable[[Callable], Callable]:
    """Decorate a command ``fn(<own parameters>, config)``: typer sees the own parameters (arguments, options no
    configuration holds) followed by one keyword parameter per option, defaults from ``config_type()``; the
    command is called with ``config=`` the configuration built from them (:func:`build`)."""
    options = tuple(options)
    check_unique(options)
    defaults = config_type()

    def decorate(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "config"]
        clash = {p.name for p in own} & {o.param for o in options}
        if clash:
            raise TypeError(f"{fn.__name__}: parameters {sorted(clash)} are also options of its configuration")
        generated = [inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, default=o.cli_default(defaults),
                                       annotation=o.annotated()) for o in options]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {o.param: kwargs.pop(o.param) for o in options}
            return fn(**kwargs, config=build(config_type, options, values))

        command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + generated)
        command.options = options  # type: ignore[attr-defined]
        return command

    return decorate
