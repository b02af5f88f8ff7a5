"""``esa superweights``: detect super weights from activation spikes (:mod:`esa.superweight_detection`) and write
the run directory.

Files: ``superweights.csv`` (accepted as it is by ``esa perturb --weights``), ``layers.csv`` (every layer's spikes),
``metrics.json``, ``config.json``, ``experiment_manifest.json`` (last).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from esa.config import SuperweightsConfig, resolve_seq_len, to_dict, validate
from esa.manifest import Timer, build_manifest
from esa.planning import with_planned_batch_size
from esa.runio import MANIFEST, atomic_write_csv, atomic_write_json, begin_run, prepare_run_dir
from esa.session import Session, open_session
from esa.superweight_detection import CSV_HEADER, Candidate, detect, mediation, profile_ranks
from esa.superweight_registry import lookup


def candidate_rows(found: list[Candidate]) -> list[tuple]:
    return [(i + 1, c.tensor, "" if c.layer is None else c.layer, "" if c.expert is None else c.expert, c.row, c.col,
             c.flat_index, c.in_channel, c.out_channel, repr(c.input_spike), repr(c.output_spike),
             repr(c.input_ratio), repr(c.output_ratio), repr(c.weight), c.iteration, c.known)
            for i, c in enumerate(found)]


def run_superweights(config: SuperweightsConfig, *, session: Session | None = None) -> dict:
    """Detect and write the run; ``session`` reuses a loaded model and its windows (``esa.api``)."""
    validate(config)
    out_dir = prepare_run_dir(Path(config.out_dir), overwrite=config.overwrite)
    config = replace(config, data=with_planned_batch_size(config.model, None, config.data,
                                                          command="baseline"))  # forward passes only
    timer = Timer()
    with timer.phase("load"):
        session = session or open_session(config.model, config.data)
    config = replace(config, data=resolve_seq_len(config.data, session.loaded.max_positions))
    model = session.loaded.model
    if config.data.max_samples is not None:
        ids, source = session.windows.input_ids, f"{session.windows.n} evaluation windows"
    else:
        ids = session.loaded.tokenizer(config.prompt, return_tensors="pt").input_ids
        source = f"prompt {config.prompt!r} ({ids.shape[1]} tokens)"
    with timer.phase("detect"):
        found, layers = detect(model, ids, threshold=config.threshold, relative=config.relative_threshold,
                               iterate=config.iterate, max_iterations=config.max_iterations,
                               batch_size=config.data.batch_size)
    entry = lookup(session.loaded.model_id)
    comparison = None
    if entry is not None:
        published = {(t, row, col) for t, _, row, col in entry.tensors()}
        for c in found:
            c.known = "yes" if (c.tensor, c.row, c.col) in published else "no"
        mine = {(c.tensor, c.row, c.col) for c in found}
        comparison = {"model": entry.name, "source": entry.source, "published": len(published),
                      "found_published": len(published & mine), "missed": sorted(map(list, published - mine))}
    ranks = None
    if config.from_profile:
        ranks = profile_ranks(Path(config.from_profile), found, session.loaded.model_id)
    med = None
    if config.mediation and found:
        with timer.phase("mediation"):
            med = mediation(model, found, session.windows.input_ids, config.data.batch_size)

    begin_run(out_dir, config.overwrite)
    atomic_write_json(out_dir / "config.json", to_dict(config))
    atomic_write_csv(out_dir / "superweights.csv", CSV_HEADER, candidate_rows(found))
    atomic_write_csv(out_dir / "layers.csv", ("tensor", "layer", "expert", "in_channel", "input_spike",
                                              "input_ratio", "out_channel", "output_spike", "output_ratio"), layers)
    metrics = {"input": source, "threshold": config.threshold, "relative_threshold": config.relative_threshold,
               "rule": "spike = |x|max > threshold and > relative_threshold × median over channels of |x_c|max, "
                       "for both the down projection's input and output",
               "found": len(found), "iterations": max((c.iteration for c in found), default=-1) + 1,
               "layers_scanned": len(layers), "registry": comparison, "profile_ranks": ranks, "mediation": med,
               "note": None if found else "no activation spike passes the thresholds: this model shows no super "
                                          "weight by this criterion"}
    if config.mediation and not found:
        metrics["mediation"] = {"skipped": "no super weight found"}
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_json(out_dir / MANIFEST, build_manifest("superweights", timer=timer, extra=session.describe()))
    return {"out_dir": out_dir, "found": found, "metrics": metrics}
