"""Every option of esa's commands, declared once: name, type, help, panel, default and where its value goes.

Both faces of esa read this table: the command line (``esa.cli.options`` turns each option into a Typer
parameter) and the Python API (``esa.api``: the same options as keyword arguments, same names and defaults). This
module imports neither typer nor torch.

An option is an :class:`Opt`: the dotted path of the configuration field it sets (``"data.seq_len"``), its
type, help and help panel. Its default is read from the command's configuration dataclass (esa/config.py), so
a default is written once, there. Options come in groups (``MODEL_OPTIONS``, ``DATA_OPTIONS``, ``SELECTION``
...); a :class:`Command` names the groups a command takes, its configuration type and how the configuration is
built from the option values (:meth:`Command.config`). ``esa run`` takes the groups of every phase it runs, so it
accepts every option of ``esa baseline``, ``esa profile``, ``esa perturb`` and ``esa report`` but the few that
only make sense for one phase (``PHASE_ONLY``).

To add an option:

1. give the configuration a field with its default (esa/config.py) and check its value in
   ``esa.config.validate``;
2. declare it here, e.g. ``DEVICE_MAP = Opt("model.device_map", Optional[str], "help ...", MODEL_DATA)``;
3. add it to the group whose commands take it (``MODEL_OPTIONS`` → baseline, profile, perturb, run,
   superweights, validate, plan); a command with a field of its own takes a group of its own (see ``DETECTION``).

A flag (type ``bool``) is ``--name/--no-name``. An option whose value differs in form from the field
(``--seeds 0,1,2`` → ``[0, 1, 2]``) gives ``to_config`` (and ``to_cli`` for the default shown in help);
``to_config`` also takes the Python form (a list), as the API passes it. Options of a single command that no
configuration holds (``esa plan --command``) are declared here too, with their ``default``, as the command's
``own`` options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from esa.config import (BaselineConfig, PerturbConfig, ProfileConfig, ReportConfig, RunbookConfig, SuperweightsConfig,
                        TensorsConfig, ValidateConfig)
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

    def cli_default(self, config: Any) -> Any:
        """The default in the command line's form: ``default`` when given, else ``config``'s field (``to_cli``)."""
        if self.default is not _FROM_CONFIG:
            return self.default
        value = config
        for part in self.path.split("."):
            value = getattr(value, part)
        return self.to_cli(value) if self.to_cli else value


# ----------------------------------------------------------------------------------------------- conversions
def _items(value: Any, name: str) -> list[str]:
    """A list option's items: from the command line's comma-separated text, or from a Python list / tuple."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise EsaError(f"{name} must be a list or comma-separated text (got {type(value).__name__})")


def parse_seeds(value: Any) -> list[int]:
    """``"0,1,2"`` (or ``[0, 1, 2]``) → ``[0, 1, 2]`` (their checks: :func:`esa.config.validate_seeds`)."""
    try:
        return [int(s) for s in _items(value, "--seeds")]
    except ValueError:
        raise EsaError(f"--seeds {value!r}: use comma-separated integers like 0,1,2") from None


def parse_controls(value: Any) -> list[str]:
    names = _items(value, "--controls")
    return [] if [n.lower() for n in names] in ([], ["none"]) else names


def parse_names(value: Any) -> list[str]:
    return _items(value, "--metrics")


def _joined(values: list) -> str:
    return ",".join(map(str, values))


def _path_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _to_path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _globs(value: Any) -> list[str]:
    """--include / --exclude: each repetition one glob (a Python string: comma-separated globs)."""
    return _items(value, "--include/--exclude")


def _list_or_none(values: list[str]) -> list[str] | None:
    return list(values) or None


def _max_memory(value: Any) -> str | None:
    """--max-memory repeated (or a Python list) → one comma-separated string; a string stays as it is."""
    if value is None or isinstance(value, str):
        return value or None
    return ",".join(map(str, value)) or None


# ----------------------------------------------------------------------------------------------- model and data
MODEL = Opt("model.model", Optional[str], "Hugging Face hub id or local model directory (default: the embedded "
            "tiny model)", MODEL_DATA, flags=("--model", "-m"), to_config=_path_or_none)
DTYPE = Opt("model.dtype", str, "auto | float32 | bfloat16 | float16 (auto: float32 on CPU, the checkpoint's "
            "bf16/fp16 on CUDA)", MODEL_DATA)
DEVICE = Opt("model.device", str, "auto | cpu | cuda | cuda:N | mps", MODEL_DATA)
REVISION = Opt("model.revision", Optional[str], "hub revision (branch, tag or commit)", MODEL_DATA)
TRUST_REMOTE_CODE = Opt("model.trust_remote_code", bool, "allow model code from the hub", MODEL_DATA)
DEVICE_MAP = Opt("model.device_map", Optional[str], "split the model across devices with accelerate: auto | "
                 "balanced | sequential | FILE.json (module name → device) (default: the whole model on --device)",
                 MODEL_DATA, to_config=_path_or_none)
MAX_MEMORY = Opt("model.max_memory", Optional[list[str]], "memory per device for --device-map, e.g. 0=70GiB "
                 "(repeatable) or 0=70GiB,1=70GiB,cpu=200GiB", MODEL_DATA,
                 to_config=_max_memory, to_cli=lambda joined: joined.split(",") if joined else None)
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
              "'*layers.1.mlp.*'", SELECTION_PANEL, to_config=_globs, to_cli=_list_or_none)
EXCLUDE = Opt("selection.exclude", Optional[list[str]], "skip tensors matching this glob (repeatable)",
              SELECTION_PANEL, to_config=_globs, to_cli=_list_or_none)
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
# Options of one command that no configuration holds: the command's ``own`` options, with their defaults.
PLAN_COMMAND = Opt("command", str, "the command to plan: baseline | profile | perturb | run", PLANNING, default="run")
DEVICE_MEMORY = Opt("device_memory", Optional[str], "memory of the device to plan for, e.g. 80GB (default: this "
                    "machine's GPU)", PLANNING, default=None)
JSON = Opt("json", bool, "print the plan as JSON", PLANNING, flags=("--json/--no-json",), name="json_output",
           default=False)  # the command line's only: how to print the plan, not what to plan
TINY_STEPS = Opt("steps", int, "optimizer steps", None)  # esa tiny train (its defaults: esa.tiny.train.TinyRecipe)


# ----------------------------------------------------------------------------------------------- the mechanism
def _set(config: Any, path: str, value: Any) -> Any:
    """``config`` with the field at dotted ``path`` set to ``value`` (nested dataclasses are replaced too)."""
    head, _, rest = path.partition(".")
    if rest:
        value = _set(getattr(config, head), rest, value)
    return dataclasses.replace(config, **{head: value})


def build(config_type: type, options: Iterable[Opt], values: dict[str, Any]) -> Any:
    """The configuration the options describe: ``config_type()`` with every option's field set (``to_config``)."""
    config = config_type()
    for opt in options:
        value = values[opt.param]
        config = _set(config, opt.path, opt.to_config(value) if opt.to_config else value)
    return config


def check_unique(options: Iterable[Opt]) -> None:
    """Refuse two options that share a parameter name or a flag."""
    seen: dict[str, str] = {}
    for opt in options:
        for key in (opt.param, *opt.long_flags, *(f for f in opt.decls if not f.startswith("--"))):
            if key in seen:
                raise TypeError(f"option {key} is declared twice ({seen[key]} and {opt.path})")
            seen[key] = opt.path


def _validate_selection(config: ValidateConfig) -> ValidateConfig:
    """esa validate: the tensors, probes and budget are the selection's; its metric is unused, its top-k is
    validate's own (--topk)."""
    return dataclasses.replace(config, selection=dataclasses.replace(config.selection, metric="magnitude",
                                                                     mode="global", topk=config.topk))


#: The parameters where a command writes its files; from Python they default to None (no files kept).
OUTPUT_PARAMS = ("out_dir", "out")


@dataclass(frozen=True)
class Command:
    """What one command takes: its configuration type and options, the options no configuration holds
    (``own``, before the others), its positional ``arguments``, and ``finish`` (configuration → the configuration
    the command runs, for the few fields one option sets twice)."""

    name: str
    config_type: type | None
    options: tuple[Opt, ...] = ()
    own: tuple[Opt, ...] = ()
    arguments: tuple[str, ...] = ()
    finish: Callable[[Any], Any] | None = None

    def config(self, values: dict[str, Any]) -> Any:
        """The configuration the option ``values`` (by parameter name, command-line or Python form) describe."""
        assert self.config_type is not None, self.name
        config = build(self.config_type, self.options, values)
        return self.finish(config) if self.finish else config

    def defaults(self) -> dict[str, Any]:
        """Every parameter of the command (arguments, own options, options) and its command-line default."""
        config = self.config_type() if self.config_type is not None else None
        return {**{a: None for a in self.arguments}, **{o.param: o.cli_default(config) for o in self.own},
                **{o.param: o.cli_default(config) for o in self.options}}

    def opt(self, param: str) -> Opt:
        """The option (own or not) whose parameter is ``param``."""
        return next(o for o in (*self.own, *self.options) if o.param == param)

    def api_defaults(self) -> dict[str, Any]:
        """The Python API's keyword arguments: the command line's, but no files by default (``OUTPUT_PARAMS``) and
        without the options that only say how to print (``esa plan --json``)."""
        return {name: None if name in OUTPUT_PARAMS else default for name, default in self.defaults().items()
                if name != JSON.param}


#: Every command that takes options, by name.
COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("baseline", BaselineConfig, BASELINE),
    Command("profile", ProfileConfig, PROFILE),
    Command("perturb", PerturbConfig, PERTURB_COMMAND),
    Command("superweights", SuperweightsConfig, SUPERWEIGHTS),
    Command("validate", ValidateConfig, VALIDATE, finish=_validate_selection),
    Command("tensors", TensorsConfig, TENSORS),
    Command("run", RunbookConfig, RUN),
    Command("plan", RunbookConfig, RUN, own=(PLAN_COMMAND, DEVICE_MEMORY, JSON)),
    Command("report", ReportConfig, REPORT, arguments=("run_dirs",)),
    Command("compare", None, own=(REPORT_OUT.but(type=Optional[Path], help="write compare.json and "
                                                 "overlap/jaccard/spearman CSVs here", panel=None, default=None,
                                                 to_config=None, to_cli=None),), arguments=("run_dirs",)),
    Command("tiny_train", None, own=(
        OUT_DIR.but(help="where to write the model (to replace the embedded one: esa/tiny/assets with --overwrite)",
                    panel=None), TINY_STEPS, SEED.but(help="seed of initialisation and batches", panel=None),
        OVERWRITE.but(help="replace the model in --out-dir", panel=None))),
)}
