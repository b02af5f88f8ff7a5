"""Resolved configurations of esa's commands; each run writes its own to ``config.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


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
    hessian_budget: int = 4096  # most weights hessian_diag may score (one HVP per weight)
    bottom_k_include_unused: bool = False  # bottom_k may pick zero-score (unused) weights, the old behaviour
    score_groups: int | None = None  # passes over the windows, one per group of tensors; None = from the plan


@dataclass
class ProfileConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    stability_check: bool = False
    stability_fraction: float = 0.5  # share of the windows each stability seed scores on
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
    controls: list[str] = field(default_factory=lambda: ["random_k", "bottom_k"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    from_profile: str | None = None  # reuse the selection of a finished profile run
    weights_file: str | None = None  # explicit tensor,row,col list
    stability_check: bool = False  # re-select the top-k on a seeded subset of windows per seed
    stability_fraction: float = 0.5
    random_stratified: bool = True  # random_k matches the top-k's per-tensor counts
    control_sets: int = 39  # random_k sets drawn (one evaluation each); the rank p-value's floor is 1/(1 + N)
    n_bootstrap: int = 10_000
    save_plots: bool = False
    out_dir: str = "runs/perturb"
    overwrite: bool = False


@dataclass
class SuperweightsConfig:
    """``esa superweights``: activation-spike detection (see :mod:`esa.superweights`)."""

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
    """``esa validate``: exact single-weight ablations against every metric's prediction (see :mod:`esa.validate`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # tensors, probes, budget; metric unused
    metrics: list[str] = field(default_factory=list)  # empty = every metric that fits (hessian_diag within budget)
    sample: int = 2000  # seeded random weights, stratified over tensors
    topk: int = 20  # plus each metric's global top-k
    perturb: str = "zero"  # zero | sign_flip
    n_bootstrap: int = 1000
    out_dir: str = "runs/validate"
    overwrite: bool = False


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
