"""``esa validate``: exact single-weight ablations against every metric's prediction (the protocol:
:mod:`esa.metric_validation`), resumable, and the run directory.

Files: ``config.json``, ``plan.csv``, ``ablations.jsonl``, ``validate.csv``, ``validate.json``,
``plots/scatter_<metric>.png|pdf``, ``experiment_manifest.json`` (last).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from esa.config import ValidateConfig, resolve_attention, to_dict, validate
from esa.evaluate import evaluate, require_finite
from esa.fingerprint import model_fingerprint
from esa.manifest import Timer, build_manifest
from esa.metric_validation import (ABLATIONS, build_plan, default_metrics, key_of, read_plan, scatter_plots,
                                   summarize, write_plan)
from esa.perturbation import PerturbSpec, perturbed
from esa.planning import with_planned_batch_size
from esa.runio import (MANIFEST, append_jsonl, atomic_write_csv, atomic_write_json, atomic_write_jsonl, begin_run,
                       clear_run_files, prepare_resumable_run, read_jsonl, require_same_windows)
from esa.tensors import scored_tensors
from esa.scoring import needs_double_backward
from esa.selection import WeightSet
from esa.session import Session, open_session


def _prepare(config: ValidateConfig) -> tuple[Path, bool]:
    return prepare_resumable_run(Path(config.out_dir), config, overwrite=config.overwrite, marker="plan.csv",
                                 command="validate")


def run_validate(config: ValidateConfig, *, session: Session | None = None) -> dict:
    """Ablate, compare and write the run; ``session`` reuses a loaded model and its windows (``esa.api``)."""
    validate(config)
    second_order = any(needs_double_backward(m) for m in (config.metrics or ["hutchinson_diag"]))
    # scoring (the costliest metric asked for) and single-weight evaluations: perturb's phases
    config = replace(config, data=with_planned_batch_size(
        config.model, replace(config.selection, metric="hutchinson_diag" if second_order else "grad_x_weight"),
        config.data, command="perturb"))
    out_dir, resuming = _prepare(config)
    requested = to_dict(config)  # config.json: what was asked (a resumed run must ask the same)
    timer = Timer()
    with timer.phase("load"):  # every metric by default, hutchinson_diag among them
        session = session or open_session(resolve_attention(config.model, config.metrics or ["hutchinson_diag"]),
                                          config.data)
    model = session.loaded.model
    params = dict(model.named_parameters())
    metrics = list(config.metrics) or default_metrics(
        sum(t.numel for t, _ in scored_tensors(model, config.selection)), config.selection.hessian_budget)
    score_meta: dict = {}
    if resuming:
        plan = read_plan(out_dir / "plan.csv", metrics)
    else:
        with timer.phase("score"):
            plan, score_meta = build_plan(config, session, metrics)
        begin_run(out_dir, True)
        clear_run_files(out_dir, [ABLATIONS, "validate.csv", "validate.json"])
        write_plan(out_dir / "plan.csv", plan, metrics)
        atomic_write_json(out_dir / "config.json", requested)

    path = out_dir / ABLATIONS
    records = read_jsonl(path)
    if records:  # rewrite without a torn tail, so the next append starts on a line of its own
        atomic_write_jsonl(path, records)
    done = {r["key"]: r for r in records}
    windows = session.windows.input_ids
    bs = config.data.batch_size
    fingerprint = model_fingerprint(model)
    spec = PerturbSpec(config.perturb)
    with timer.phase("ablations"):
        if "baseline" not in done:
            base = evaluate(model, windows, batch_size=bs, description="baseline")
            require_finite(base)
            done["baseline"] = {"key": "baseline", "mean_nll": base.mean_nll,
                                "windows_sha256": session.windows.token_sha256()}
            append_jsonl(path, done["baseline"])
        else:
            require_same_windows(out_dir, done["baseline"].get("windows_sha256"), session.windows.token_sha256())
        base_nll = done["baseline"]["mean_nll"]
        for row in plan:
            key = key_of(row)
            if key in done:
                continue
            t0 = time.perf_counter()
            one = WeightSet([row["tensor"]], np.array([row["flat_index"]]), np.array([np.nan]), np.array([0]),
                            "explicit")
            with perturbed(params, one, spec, seed=0):
                result = evaluate(model, windows, batch_size=bs, description=key)
            done[key] = {"key": key, "delta_nll": result.mean_nll - base_nll, "mean_nll": result.mean_nll,
                         "finite": result.finite, "seconds": round(time.perf_counter() - t0, 4)}
            append_jsonl(path, done[key])
    if model_fingerprint(model) != fingerprint:
        raise RuntimeError("the model's weights changed during the ablations: restoration failed")

    with timer.phase("statistics"):
        summary = summarize(plan, done, metrics, config)
    infos = {t.name: t for t, _ in scored_tensors(model, config.selection)}
    csv_rows = []
    for r in plan:
        info = infos[r["tensor"]]
        c = info.coordinates(torch.tensor([r["flat_index"]]))
        csv_rows.append((r["tensor"], r["flat_index"], int(c["row"][0]), "" if c["col"] is None else int(c["col"][0]),
                         "" if c["expert"] is None else int(c["expert"][0]), ";".join(r["source"]),
                         repr(done[key_of(r)]["delta_nll"]), *[repr(r[m]) for m in metrics]))
    atomic_write_csv(out_dir / "validate.csv", ("tensor", "flat_index", "row", "col", "expert", "source", "delta_nll",
                                                *metrics), csv_rows)
    atomic_write_json(out_dir / "validate.json", summary)
    with timer.phase("plots"):
        scatter_plots(plan, done, metrics, out_dir / "plots")
    extra = {**session.describe(), "model_fingerprint": fingerprint, "resumed": resuming,
             "scoring": {"metrics": metrics, "meta": score_meta}}
    atomic_write_json(out_dir / MANIFEST, build_manifest("validate", timer=timer, extra=extra))
    return {"out_dir": out_dir, "summary": summary}
