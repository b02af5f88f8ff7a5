"""``esa baseline``: perplexity, loss and next-token accuracy, with the NLL of every window kept.

Files in the run directory: ``config.json`` (resolved configuration), ``metrics.json`` (PPL, mean NLL,
accuracy, tokens, leak flags), ``window_nll.csv`` (one row per window), ``experiment_manifest.json`` (last).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from esa import distributed
from esa.config import BaselineConfig, resolve_seq_len, to_dict, validate
from esa.errors import EsaError
from esa.evaluate import EvalResult, evaluate, leak_warnings, require_finite
from esa.manifest import Timer, build_manifest
from esa.modeling import LoadedModel
from esa.planning import with_planned_batch_size
from esa.runio import MANIFEST, atomic_write_csv, atomic_write_json, begin_run, prepare_run_dir
from esa.session import Session, open_session
from esa.windows import Windows

WINDOW_NLL_HEADER = ("window", "corpus_window", "nll_sum", "tokens", "mean_nll", "correct")


@dataclass
class BaselineRun:
    out_dir: Path
    result: EvalResult
    metrics: dict
    session: Session


def baseline_metrics(result: EvalResult, windows: Windows, loaded: LoadedModel) -> dict:
    warnings = leak_warnings(result, windows.input_ids)
    vocab = getattr(loaded.model.config, "vocab_size", None)
    return {
        **result.summary(),
        "seq_len": windows.seq_len,
        "uniform_guess_ppl": vocab,
        "leak_suspected": bool(warnings),
        "leak_warnings": warnings,
    }


def window_rows(result: EvalResult, windows: Windows) -> list[tuple]:
    return [
        (i, windows.window_index[i], repr(float(result.nll[i])), int(result.tokens[i]),
         repr(float(result.nll[i] / result.tokens[i])), int(result.correct[i]))
        for i in range(result.nll.size)
    ]


def write_window_nll(path: Path, result: EvalResult, windows: Windows) -> None:
    atomic_write_csv(path, WINDOW_NLL_HEADER, window_rows(result, windows))


def check_finite_weights(model) -> None:
    """Refuse a model whose weights hold NaN or Inf, naming the first such tensor (one pass, tensor by tensor)."""
    import torch

    from esa.placement import weight_tensors

    for name, p in weight_tensors(model, writable=False).items():  # offloaded weights: accelerate's copies
        bad = int((~torch.isfinite(p.detach())).sum())
        if bad:
            raise EsaError(f"the model's weights are broken: {name} holds {bad:,} NaN/Inf value(s) of {p.numel():,}; "
                           "check the checkpoint (or its --dtype conversion)")


def run_baseline(config: BaselineConfig, *, command: str = "baseline", session: Session | None = None) -> BaselineRun:
    """Evaluate and write the run; ``session`` reuses a loaded model and its windows (``esa run``)."""
    validate(config)
    out_dir = prepare_run_dir(Path(config.out_dir), overwrite=config.overwrite)
    config = replace(config, data=with_planned_batch_size(config.model, None, config.data, command="baseline"))
    timer = Timer()
    with timer.phase("load"):
        session = session or open_session(config.model, config.data)
    config = replace(config, data=resolve_seq_len(config.data, session.loaded.max_positions))
    check_finite_weights(session.loaded.model)
    with timer.phase("evaluate"):
        result = evaluate(session.loaded.model, session.windows.input_ids, batch_size=config.data.batch_size,
                          description="baseline")
    require_finite(result)
    metrics = baseline_metrics(result, session.windows, session.loaded)

    begin_run(out_dir, config.overwrite)
    atomic_write_json(out_dir / "config.json", to_dict(config))
    atomic_write_json(out_dir / "metrics.json", metrics)
    write_window_nll(out_dir / "window_nll.csv", result, session.windows)
    atomic_write_json(out_dir / MANIFEST, build_manifest(command, timer=timer, extra=session.describe()))
    distributed.barrier()  # rank 0's files are complete before any rank goes on
    return BaselineRun(out_dir=out_dir, result=result, metrics=metrics, session=session)
