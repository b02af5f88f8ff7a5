"""``esa plan``: the predicted peak device memory per phase, score groups, batch size and wall time of a command
line (:mod:`esa.planning`), for this machine's GPU or a given device memory; with ``--device-map``, per device."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from esa.config import RunbookConfig, validate
from esa.errors import EsaError
from esa.planning import format_plan, parse_size, plan_command, plan_split


@dataclass
class PlanOutcome:
    fits: bool  # every phase fits (with --device-map: every device)
    plan: dict  # as ``esa plan --json`` prints it
    lines: list[str] = field(default_factory=list)  # as ``esa plan`` prints it


def device_memory_for(config: RunbookConfig, device_memory: str | None, *, flag: str = "--device-memory") -> str:
    """The memory to plan for: ``device_memory``; else the largest GPU of ``--max-memory`` for a split model; else
    this machine's first GPU (none: a one-line error naming ``flag``)."""
    model_cfg = config.model
    if device_memory is None and model_cfg.device_map and model_cfg.max_memory:  # a split model: its largest GPU
        from esa.placement import parse_max_memory

        gpus = [v for k, v in (parse_max_memory(model_cfg.max_memory) or {}).items() if isinstance(k, int)]
        device_memory = str(max(gpus)) if gpus else None
    if device_memory is None:
        import torch

        if not torch.cuda.is_available():
            example = "80GB" if flag.startswith("--") else "'80GB'"
            raise EsaError(f"no GPU here: give {flag}, e.g. {flag}{' ' if flag.startswith('--') else '='}{example}")
        device_memory = str(torch.cuda.get_device_properties(0).total_memory)
    return device_memory


def run_plan(config: RunbookConfig, *, command: str = "run", device_memory: str | None = None,
             flag: str = "--device-memory") -> PlanOutcome:
    """Plan ``command`` (baseline | profile | perturb | run) as ``config`` describes it, on a CUDA device of
    ``device_memory`` (e.g. "80GB"; default: :func:`device_memory_for`)."""
    validate(config)
    memory = parse_size(str(device_memory_for(config, device_memory, flag=flag)))
    data, controls = config.data, config.controls
    model_cfg = replace(config.model, device="cuda", attn_implementation=None)
    result, shape, workload = plan_command(
        model_cfg, config.selection, command=command,
        seq_len=data.seq_len, max_samples=data.max_samples, batch_size=data.batch_size,
        perturb=config.perturb is not None, bottom_k="bottom_k" in controls,
        control_sets=config.control_sets if "random_k" in controls else 0, seeds=len(config.seeds),
        stability_check=config.stability_check, stability_fraction=config.stability_fraction,
        device_memory=memory)
    if not model_cfg.device_map:
        return PlanOutcome(fits=result.fits, plan=result.as_dict(), lines=list(format_plan(result)))
    split = plan_split(shape, model_cfg, workload, memory)
    # The top-level figures answer the question asked (does the split fit?); the whole model on one device stays
    # under "single_device" with its phases.
    single = result.as_dict()
    top = {k: v for k, v in split.as_dict().items() if k not in ("devices", "lines")}
    return PlanOutcome(fits=split.fits, plan={**single, **top, "single_device": {k: single[k] for k in top},
                                              "device_map": split.as_dict()},
                       lines=[*format_plan(result), *split.lines,
                              *([f"reason: {split.reason}"] if split.reason else [])])
