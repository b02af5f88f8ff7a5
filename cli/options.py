"""Flags shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from esa.config import DataConfig, ModelConfig, SelectionConfig
from esa.errors import EsaError

Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Hugging Face hub id or local model directory "
                                              "[default: the embedded tiny model]", rich_help_panel="Model")]
Dtype = Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16 (auto: float32 on CPU, the "
                                    "checkpoint's bf16/fp16 on CUDA)", rich_help_panel="Model")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps", rich_help_panel="Model")]
Revision = Annotated[Optional[str], typer.Option(help="hub revision (branch, tag or commit)", rich_help_panel="Model")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="allow model code from the hub",
                                               rich_help_panel="Model")]
AttnImplementation = Annotated[Optional[str], typer.Option(help="eager | sdpa | flash_attention_2 ...",
                                                           rich_help_panel="Model")]
DeviceMap = Annotated[Optional[str], typer.Option(help="split the model across devices with accelerate: auto | "
                                                  "balanced | sequential | FILE.json (module name → device) "
                                                  "[default: the whole model on --device]", rich_help_panel="Model")]
MaxMemory = Annotated[Optional[list[str]], typer.Option(help="memory per device for --device-map, e.g. 0=70GiB "
                                                        "(repeatable) or 0=70GiB,1=70GiB,cpu=200GiB",
                                                        rich_help_panel="Model")]

Dataset = Annotated[str, typer.Option(help="embedded (held-out Python docs) | wikitext2 (raw test split)",
                                      rich_help_panel="Data")]
DatasetPath = Annotated[Optional[Path], typer.Option(help="directory holding wiki.test.raw for --dataset wikitext2",
                                                     rich_help_panel="Data")]
TextFile = Annotated[Optional[Path], typer.Option(help="evaluate on this plain UTF-8 text file instead",
                                                  rich_help_panel="Data")]
SeqLen = Annotated[Optional[int], typer.Option(help="tokens per window [default: min(2048, model context)]",
                                               rich_help_panel="Data")]
MaxSamples = Annotated[Optional[int], typer.Option(help="number of windows (a seeded subset) [default: all]",
                                                   rich_help_panel="Data")]
# "\\[" keeps rich from reading the bracket as markup (which would drop the default from the help)
BatchSize = Annotated[Optional[int], typer.Option(help="windows per forward pass \\[default: the largest that "
                                                   "fits the device by the plan; 8 on CPU]", rich_help_panel="Data")]
Seed = Annotated[int, typer.Option(help="seed of the window subset", rich_help_panel="Data")]

OutDir = Annotated[Path, typer.Option(help="run directory for the results", rich_help_panel="Output")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace a finished run in --out-dir",
                                         rich_help_panel="Output")]


def model_config(model, dtype, device, revision, trust_remote_code, attn_implementation, device_map=None,
                 max_memory=None) -> ModelConfig:
    return ModelConfig(model=model, dtype=dtype, device=device, revision=revision,
                       trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
                       device_map=device_map, max_memory=",".join(max_memory) if max_memory else None)


def data_config(dataset, dataset_path, text_file, seq_len, max_samples, batch_size, seed) -> DataConfig:
    return DataConfig(dataset=dataset, dataset_path=str(dataset_path) if dataset_path else None,
                      text_file=str(text_file) if text_file else None, seq_len=seq_len, max_samples=max_samples,
                      batch_size=batch_size, seed=seed)


# ----------------------------------------------------------------------------------------------- selection
Metric = Annotated[str, typer.Option(help="grad_x_weight | grad_squared | hessian_diag | hutchinson_diag | magnitude "
                                     "| act_mag | taylor | obd (signed estimates of the loss change of zeroing a weight, "
                                     "ranked by |value|)", rich_help_panel="Selection")]
Mode = Annotated[str, typer.Option(help="per_layer (top-k in every tensor) | global (top-k over the whole model)",
                                   rich_help_panel="Selection")]
TopK = Annotated[int, typer.Option("--topk", "-k", help="weights selected (per tensor in per_layer mode)",
                                   rich_help_panel="Selection")]
BottomKIncludeUnused = Annotated[bool, typer.Option(
    "--bottom-k-include-unused", help="let bottom_k pick weights with a zero score (unused by the evaluation, e.g. "
    "embedding rows of tokens that never occur); by default they are left out and counted",
    rich_help_panel="Selection")]
Include = Annotated[Optional[list[str]], typer.Option(help="score only tensors matching this glob (repeatable), e.g. "
                                                      "'*layers.1.mlp.*'", rich_help_panel="Selection")]
Exclude = Annotated[Optional[list[str]], typer.Option(help="skip tensors matching this glob (repeatable)",
                                                      rich_help_panel="Selection")]
IncludeBiases = Annotated[bool, typer.Option("--include-biases", help="score bias vectors too",
                                             rich_help_panel="Selection")]
IncludeNorms = Annotated[bool, typer.Option("--include-norms", help="score normalisation scales too",
                                            rich_help_panel="Selection")]
HutchinsonProbes = Annotated[int, typer.Option(help="Rademacher probes per batch for hutchinson_diag",
                                               rich_help_panel="Selection")]
HessianBudget = Annotated[int, typer.Option(help="most weights hessian_diag may score exactly (one Hessian-vector "
                                            "product each)", rich_help_panel="Selection")]
ScoreGroups = Annotated[Optional[int], typer.Option(help="score the tensors in N groups, one pass over the windows "
                                                    "each (same results, less memory) [default: from the plan]",
                                                    rich_help_panel="Selection")]
Seeds = Annotated[str, typer.Option(help="comma-separated seeds, e.g. 0,1,2", rich_help_panel="Seeds")]
StabilityCheck = Annotated[bool, typer.Option("--stability-check", help="repeat the selection on a seeded subset of "
                                              "the windows per seed and report top-k Jaccard", rich_help_panel="Seeds")]
StabilityFraction = Annotated[float, typer.Option(help="share of the windows each stability seed uses",
                                                  rich_help_panel="Seeds")]
SavePlots = Annotated[bool, typer.Option("--save-plots", help="write figures (PNG and PDF) under plots/",
                                         rich_help_panel="Output")]

# ----------------------------------------------------------------------------------------------- perturbation
Perturb = Annotated[str, typer.Option(help="zero | sign_flip | gauss_noise | bit_flip", rich_help_panel="Perturbation")]
PerturbScale = Annotated[float, typer.Option(help="sign_flip: w ← -S·w; gauss_noise: w ← w + S·|w|·ε",
                                             rich_help_panel="Perturbation")]
PerturbProb = Annotated[float, typer.Option(help="bit_flip: probability that a selected weight gets one bit flipped",
                                            rich_help_panel="Perturbation")]
Bits = Annotated[str, typer.Option(help="bit_flip: any | sign | exponent | mantissa | positions like 14,13 "
                                   "(0 = least significant)", rich_help_panel="Perturbation")]
Controls = Annotated[str, typer.Option(help="comma-separated controls: random_k, bottom_k (or 'none')",
                                       rich_help_panel="Perturbation")]
FromProfile = Annotated[Optional[Path], typer.Option(help="reuse the selection of this finished profile run",
                                                     rich_help_panel="Perturbation")]
WeightsFile = Annotated[Optional[Path], typer.Option("--weights", help="CSV of tensor,row,col[,expert] (or "
                                                     "tensor,flat_index) to ablate jointly, or 'known': the model's published super weights",
                                                     rich_help_panel="Perturbation")]
Stratified = Annotated[bool, typer.Option("--stratified/--unstratified", help="random_k matches the top-k's "
                                          "per-tensor counts (default) or is uniform over all scored weights",
                                          rich_help_panel="Perturbation")]
ControlSets = Annotated[int, typer.Option(help="random_k control sets, each drawn from (--seed, set index) and "
                                          "evaluated once; the super set is ranked against them, so the smallest "
                                          "p-value is 1/(1+N) (19 reach 0.05, 39 reach 0.025)",
                                          rich_help_panel="Perturbation")]
NBootstrap = Annotated[int, typer.Option(help="bootstrap resamples of the windows for confidence intervals",
                                         rich_help_panel="Perturbation")]


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise EsaError(f"--seeds {text!r}: use comma-separated integers like 0,1,2") from None
    if not seeds:
        raise EsaError("--seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise EsaError(f"--seeds {text!r} repeats a seed")
    return seeds


def parse_controls(text: str) -> list[str]:
    if text.strip().lower() in ("", "none"):
        return []
    return [c.strip() for c in text.split(",") if c.strip()]


def selection_config(metric, mode, topk, include, exclude, include_biases, include_norms, hutchinson_probes,
                     hessian_budget, bottom_k_include_unused: bool = False, score_groups=None) -> SelectionConfig:
    return SelectionConfig(metric=metric, mode=mode, topk=topk, include=list(include or []),
                           exclude=list(exclude or []), include_biases=include_biases, include_norms=include_norms,
                           hutchinson_probes=hutchinson_probes, hessian_budget=hessian_budget,
                           bottom_k_include_unused=bottom_k_include_unused, score_groups=score_groups)
