"""Configurations of esa's commands (each run writes its own, resolved, to ``config.json``), their one
validation (:func:`validate`) and their resolution (:func:`resolve_attention`, :func:`resolve_seq_len`).

The dataclass defaults are the defaults of the command line and the Python API too: ``esa/options.py`` reads
them from here.
Every check of a configuration value lives in this module, so that ``esa <command>``, ``esa run`` and the
library entry points (``run_profile`` ...) refuse the same input with the same one-line :class:`EsaError`.
Resolution never mutates its argument: it returns a new configuration (``dataclasses.replace``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from esa.errors import EsaError

HESSIAN_BUDGET = 4096  # most weights hessian_diag scores exactly (one Hessian-vector product each)
#: The sensitivity metrics (formulas: esa.scoring) and the selection modes, named here so that a configuration can be
#: checked without importing the code that computes them.
METRICS = ("grad_x_weight", "grad_squared", "hessian_diag", "hutchinson_diag", "magnitude", "act_mag", "taylor", "obd")
MODES = ("per_layer", "global")
SEEDS = (0, 1, 2)  # seeds of the perturbation trials and of the stability check
CONTROLS = ("random_k", "bottom_k")  # the control sets perturb knows, all run by default
DEFAULT_MAX_SEQ_LEN = 2048  # the default window length, capped at the model's context (default_seq_len)
STABILITY_FRACTION = 0.5  # share of the windows each stability seed scores on
CONTROL_SETS = 39  # random_k sets; the rank p-value's floor is 1/(1 + N), so 39 reach 0.025
N_BOOTSTRAP = 10_000  # bootstrap resamples of the windows (perturb)
MIN_BOOTSTRAP = 100  # fewer resamples give no usable confidence interval
MIN_VALIDATE_SAMPLE = 10  # fewer sampled weights give no usable rank correlation
VALIDATE_KINDS = ("zero", "sign_flip")  # the perturbations whose loss change every metric predicts


@dataclass
class ModelConfig:
    model: str | None = None  # hub id or local directory; None = the embedded tiny model
    dtype: str = "auto"
    device: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    device_map: str | None = None  # auto | balanced | sequential | FILE.json: split the model with accelerate
    max_memory: str | None = None  # per device for --device-map, e.g. "0=70GiB,1=70GiB,cpu=200GiB"


@dataclass
class DataConfig:
    dataset: str = "embedded"  # "embedded" or "wikitext2"
    dataset_path: str | None = None
    text_file: str | None = None
    seq_len: int | None = None  # None = min(2048, model context)
    max_samples: int | None = None  # None = every window
    batch_size: int | None = None  # None = the largest that fits the device by the plan; 8 on CPU
    seed: int = 0


@dataclass
class BaselineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    out_dir: str = "runs/baseline"
    overwrite: bool = False


@dataclass
class SelectionConfig:
    """Which weights are scored, how, and how many are selected."""

    metric: str = "grad_x_weight"
    mode: str = "per_layer"  # per_layer: top-k in every tensor; global: top-k over the whole model
    topk: int = 100
    include: list[str] = field(default_factory=list)  # glob patterns on tensor names; empty = every weight matrix
    exclude: list[str] = field(default_factory=list)
    include_biases: bool = False
    include_norms: bool = False
    hutchinson_probes: int = 8
    hessian_budget: int = HESSIAN_BUDGET  # most weights hessian_diag may score (one HVP per weight)
    bottom_k_include_unused: bool = False  # bottom_k may pick zero-score (unused) weights, the old behaviour
    score_groups: int | None = None  # passes over the windows, one per group of tensors; None = from the plan


@dataclass
class ProfileConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    stability_check: bool = False
    stability_fraction: float = STABILITY_FRACTION  # share of the windows each stability seed scores on
    save_scores: bool = False
    save_plots: bool = False
    out_dir: str = "runs/profile"
    overwrite: bool = False


@dataclass
class PerturbConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    perturb: str = "zero"  # zero | sign_flip | gauss_noise | bit_flip
    perturb_scale: float = 1.0
    perturb_prob: float = 1.0
    bits: str = "any"
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    from_profile: str | None = None  # reuse the selection of a finished profile run
    weights_file: str | None = None  # explicit tensor,row,col list
    stability_check: bool = False  # re-select the top-k on a seeded subset of windows per seed
    stability_fraction: float = STABILITY_FRACTION
    random_stratified: bool = True  # random_k matches the top-k's per-tensor counts
    control_sets: int = CONTROL_SETS  # random_k sets drawn (one evaluation each); the rank p-value's floor is 1/(1 + N)
    n_bootstrap: int = N_BOOTSTRAP
    save_plots: bool = False
    out_dir: str = "runs/perturb"
    overwrite: bool = False


@dataclass
class SuperweightsConfig:
    """``esa superweights``: activation-spike detection (see :mod:`esa.superweight_detection`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # windows are the input only with max_samples set
    prompt: str = "Apple Inc. is a worldwide tech company."
    threshold: float = 50.0  # absolute spike threshold (Yu et al. 2024)
    relative_threshold: float = 10.0  # spike / median over channels of their maxima
    iterate: bool = False
    max_iterations: int = 10
    from_profile: str | None = None
    mediation: bool = False
    out_dir: str = "runs/superweights"
    overwrite: bool = False


@dataclass
class ValidateConfig:
    """``esa validate``: exact single-weight ablations against every metric's prediction (see :mod:`esa.metric_validation`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # tensors, probes, budget; metric unused
    metrics: list[str] = field(default_factory=list)  # empty = every metric that fits (hessian_diag within budget)
    sample: int = 2000  # seeded random weights, stratified over tensors
    topk: int = 20  # plus each metric's global top-k
    perturb: str = "zero"  # one of VALIDATE_KINDS
    n_bootstrap: int = 1000
    out_dir: str = "runs/validate"
    overwrite: bool = False


@dataclass
class RunbookConfig:
    """``esa run``: every option of the phases it runs (baseline → profile → perturb → report)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(dataset="auto"))  # auto: see esa.commands.run
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    perturb: str | None = None  # None: no perturbation phase
    perturb_scale: float = 1.0
    perturb_prob: float = 1.0
    bits: str = "any"
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    stability_check: bool = False
    stability_fraction: float = STABILITY_FRACTION
    random_stratified: bool = True
    control_sets: int = CONTROL_SETS
    n_bootstrap: int = N_BOOTSTRAP
    save_scores: bool = False
    save_plots: bool = False
    out_dir: str = "runs/runbook"
    overwrite: bool = False


@dataclass
class TensorsConfig:
    """``esa tensors``: the tensors profile would score (loads the weights, on the CPU by default)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(device="cpu"))
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # only the tensor choice is used


@dataclass
class ReportConfig:
    """``esa report``: where the report goes."""

    out: str = "runs/report"
    overwrite: bool = False


# ----------------------------------------------------------------------------------------------- validation
def check_probes(probes: int) -> None:
    """--hutchinson-probes (also checked where the library is called directly: esa.scoring)."""
    if probes < 1:
        raise EsaError(f"--hutchinson-probes must be at least 1 (got {probes})")


def check_bootstrap(n_bootstrap: int) -> None:
    """--n-bootstrap of esa perturb and esa validate."""
    if n_bootstrap < MIN_BOOTSTRAP:
        raise EsaError(f"--n-bootstrap must be at least {MIN_BOOTSTRAP}")


def validate_data(data: DataConfig) -> None:
    """Checks that need neither the model nor the text, so bad flags fail before anything slow happens."""
    if data.max_samples is not None and data.max_samples < 1:
        raise EsaError(f"--max-samples must be at least 1 (got {data.max_samples})")
    if data.batch_size is not None and data.batch_size < 1:
        raise EsaError(f"--batch-size must be at least 1 (got {data.batch_size})")
    if data.seq_len is not None and data.seq_len < 2:
        raise EsaError(f"--seq-len must be at least 2 (got {data.seq_len})")


def validate_selection(sel: SelectionConfig) -> None:
    """Metric, mode, k, probes, budget and groups (the tensor globs need the model: see esa.tensors)."""
    check_metric(sel.metric)
    if sel.mode not in MODES:
        raise EsaError(f"unknown --mode {sel.mode!r}; use per_layer or global")
    if sel.topk < 1:
        raise EsaError(f"--topk must be at least 1 (got {sel.topk})")
    check_probes(sel.hutchinson_probes)
    if sel.hessian_budget < 1:
        raise EsaError(f"--hessian-budget must be at least 1 (got {sel.hessian_budget})")
    if sel.score_groups is not None and sel.score_groups < 1:
        raise EsaError(f"--score-groups must be at least 1 (got {sel.score_groups})")


def validate_seeds(seeds: list[int], *, stability_check: bool, stability_fraction: float) -> None:
    """At least one seed, none repeated; the stability check compares two seeds or more on a share in (0, 1]."""
    if not seeds:
        raise EsaError("--seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise EsaError(f"--seeds {','.join(map(str, seeds))!r} repeats a seed")
    if stability_check:
        if len(seeds) < 2:
            raise EsaError("--stability-check needs at least two --seeds (e.g. --seeds 0,1,2)")
        if not 0 < stability_fraction <= 1:
            raise EsaError("--stability-fraction must be in (0, 1]")


def validate_perturbation(kind: str, scale: float, prob: float, bits: str) -> None:
    """The perturbation's kind, scale and probability (the bits also need the weights' dtype: esa.perturbation)."""
    from esa.kernels import KINDS

    if kind not in KINDS:
        raise EsaError(f"unknown --perturb {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "bit_flip" and not 0.0 < prob <= 1.0:
        raise EsaError(f"--perturb-prob must be in (0, 1] (got {prob})")
    if kind == "gauss_noise" and scale <= 0:
        raise EsaError(f"--perturb-scale must be positive for gauss_noise (got {scale})")


def validate_controls(controls: list[str], control_sets: int, n_bootstrap: int) -> None:
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise EsaError(f"unknown control {unknown[0]!r} in --controls; use random_k and/or bottom_k")
    if "random_k" in controls and control_sets < 1:
        raise EsaError("--control-sets must be at least 1 (39 or more let a rank p-value reach 0.025)")
    check_bootstrap(n_bootstrap)


def validate(config: Any) -> None:
    """Refuse any invalid value of ``config`` (any configuration of this module) with a one-line EsaError.

    Called by every command and library entry point before anything slow (loading a model) happens."""
    if isinstance(config, BaselineConfig):
        validate_data(config.data)
    elif isinstance(config, ProfileConfig):
        validate_data(config.data)
        validate_selection(config.selection)
        validate_seeds(config.seeds, stability_check=config.stability_check,
                       stability_fraction=config.stability_fraction)
    elif isinstance(config, PerturbConfig):
        validate_data(config.data)
        validate_perturbation(config.perturb, config.perturb_scale, config.perturb_prob, config.bits)
        validate_controls(config.controls, config.control_sets, config.n_bootstrap)
        if config.from_profile and config.weights_file:
            raise EsaError("use either --from-profile or --weights, not both")
        if config.weights_file and config.stability_check:
            raise EsaError("--stability-check needs selected (not explicit) weights; drop --weights or the check")
        validate_seeds(config.seeds, stability_check=config.stability_check,
                       stability_fraction=config.stability_fraction)
        if not config.from_profile and not config.weights_file:
            validate_selection(config.selection)
    elif isinstance(config, RunbookConfig):
        validate_data(config.data)
        validate_selection(config.selection)
        validate_seeds(config.seeds, stability_check=config.stability_check,
                       stability_fraction=config.stability_fraction)
        if config.perturb is not None:
            validate_perturbation(config.perturb, config.perturb_scale, config.perturb_prob, config.bits)
            validate_controls(config.controls, config.control_sets, config.n_bootstrap)
    elif isinstance(config, SuperweightsConfig):
        validate_data(config.data)
        if config.threshold < 0 or config.relative_threshold < 0:
            raise EsaError("--threshold and --relative-threshold must not be negative")
        if config.max_iterations < 1:
            raise EsaError("--max-iterations must be at least 1")
    elif isinstance(config, ValidateConfig):

        validate_data(config.data)
        for m in config.metrics:
            check_metric(m)
        if len(set(config.metrics)) != len(config.metrics):
            raise EsaError("--metrics names a metric twice")
        if config.perturb not in VALIDATE_KINDS:
            raise EsaError(f"--perturb {config.perturb!r}: esa validate ablates with zero or sign_flip")
        if config.sample < MIN_VALIDATE_SAMPLE:
            raise EsaError(f"--sample must be at least {MIN_VALIDATE_SAMPLE} (got {config.sample})")
        if config.topk < 1:
            raise EsaError(f"--topk must be at least 1 (got {config.topk})")
        check_bootstrap(config.n_bootstrap)
    elif isinstance(config, TensorsConfig):
        pass  # the tensor globs are checked against the model
    elif not isinstance(config, ReportConfig):
        raise TypeError(f"validate: not a configuration of esa.config: {type(config).__name__}")


# ----------------------------------------------------------------------------------------------- resolution
def resolve_attention(model: ModelConfig, metrics: list[str] | tuple[str, ...]) -> ModelConfig:
    """``model`` with eager attention when any of ``metrics`` needs double backward and no attention
    implementation was asked for (the fused kernels have no second derivative); else ``model`` itself."""

    if model.attn_implementation or not any(needs_double_backward(m) for m in metrics):
        return model
    return replace(model, attn_implementation="eager")


def default_seq_len(max_positions: int | None) -> int:
    """``min(2048, the model's context)`` — never the model's full context silently (131072 for Llama-3.1)."""
    return min(DEFAULT_MAX_SEQ_LEN, max_positions) if max_positions else DEFAULT_MAX_SEQ_LEN


def resolve_seq_len(data: DataConfig, max_positions: int | None) -> DataConfig:
    """``data`` with ``seq_len`` filled in (min(2048, the model's context)) when it was left to the default."""
    return data if data.seq_len is not None else replace(data, seq_len=default_seq_len(max_positions))


def same_config(saved: dict, config: Any, *, ignore: tuple[str, ...] = ()) -> bool:
    """Whether ``saved`` (a run's config.json) describes ``config``, top-level keys in ``ignore`` aside."""
    mine = to_dict(config)
    return ({k: v for k, v in saved.items() if k not in ignore} == {k: v for k, v in mine.items() if k not in ignore})


def to_dict(config: Any) -> dict:
    def clean(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return clean(asdict(config))


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise EsaError(f"unknown --metric {metric!r}; use one of {', '.join(METRICS)}")


def needs_double_backward(metric: str) -> bool:
    """Only the exact ``hessian_diag`` differentiates through a gradient's graph (with eager attention)."""
    return metric == "hessian_diag"
