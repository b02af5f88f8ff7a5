"""``esa perturb``: run (or resume) the causal trials of :mod:`esa.trials` and write the run directory.

The protocol (which sets, which seeds, how trials resume and are reused) is :mod:`esa.trials`'; the statistics of
``results.json`` are :mod:`esa.stats`'. Files: ``config.json``, ``sets/<condition>_seed<S>.csv`` and
``sets/random_k_set<J>.csv``, ``trials.jsonl`` (one JSON object per trial, the baseline first), ``results.json``,
``plots/`` with ``--save-plots``, and ``experiment_manifest.json`` last.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from esa import distributed
from esa.config import CONTROLS, PerturbConfig, to_dict, validate
from esa.errors import EsaError
from esa.evaluate import evaluate, require_finite
from esa.fingerprint import model_fingerprint
from esa.manifest import Timer, build_manifest
from esa.perturbation import perturbed, validate_spec
from esa.placement import weight_tensors
from esa.planning import with_planned_batch_size
from esa.runio import (MANIFEST, append_jsonl, atomic_write_json, begin_run, clear_run_files, prepare_resumable_run,
                       read_jsonl, require_same_windows)
from esa.scoreselect import open_for_selection, resolved_for
from esa.session import Session
from esa.trials import (TRIALS, build_sets, control_seed, load_sets, save_sets, set_hash, spec_of, summarize,
                        trial_plan, trial_record, with_profile_selection)


def prepare_perturb_dir(config: PerturbConfig) -> tuple[Path, bool]:
    """(run directory, resuming?): a finished run needs --overwrite; an unfinished one with the same
    configuration resumes; an unfinished one with another configuration is refused."""
    return prepare_resumable_run(Path(config.out_dir), config, overwrite=config.overwrite, marker=TRIALS,
                                 command="perturb", ignore=("overwrite", "save_plots"))


def run_perturb(config: PerturbConfig, *, command: str = "perturb", session: Session | None = None) -> dict:
    """Run (or resume) the trials and write the run; ``session`` reuses a loaded model (``esa run``)."""
    validate(config)
    if config.from_profile:
        config = with_profile_selection(config)
    config = dataclasses.replace(config, data=with_planned_batch_size(config.model, config.selection, config.data,
                                                                      command="perturb"))
    out_dir, resuming = prepare_perturb_dir(config)
    distributed.barrier()  # every rank has seen the directory as it was before rank 0 changes it
    timer = Timer()
    with timer.phase("load"):
        session = session or open_for_selection(config.model, config.data, config.selection)
    config = resolved_for(config, session)
    model = session.loaded.model
    params = weight_tensors(model)  # perturbed in place where they live (offloaded ones: accelerate's CPU copy)
    spec = spec_of(config)
    validate_spec(spec, next(iter(params.values())).dtype)
    conditions = ["super"] + [c for c in CONTROLS if c in config.controls]
    if config.weights_file and "bottom_k" in conditions:
        conditions.remove("bottom_k")  # an explicit set has no scores to rank

    plan = trial_plan(config, conditions)
    if resuming:
        sets = load_sets(out_dir, plan)
    else:
        with timer.phase("select"):
            sets = build_sets(config, session, conditions)
        begin_run(out_dir, True)
        clear_run_files(out_dir, [TRIALS, "results.json"])
        save_sets(out_dir, sets, model)
        atomic_write_json(out_dir / "config.json", to_dict(config))

    trials_path = out_dir / TRIALS
    # Rank 0's reading decides which trials remain (the others may have read before it cleared the file).
    done = distributed.broadcast({r["trial_id"]: r for r in read_jsonl(trials_path)})
    fingerprint_before = model_fingerprint(model)
    batch_size = config.data.batch_size
    windows = session.windows.input_ids
    with timer.phase("trials"):
        if "baseline" not in done:
            t0 = time.perf_counter()
            base = evaluate(model, windows, batch_size=batch_size, description="baseline")
            require_finite(base)
            done["baseline"] = trial_record("baseline", "baseline", None, base, time.perf_counter() - t0,
                                       windows_sha256=session.windows.token_sha256())
            append_jsonl(trials_path, done["baseline"])
        else:
            require_same_windows(out_dir, done["baseline"].get("windows_sha256"), session.windows.token_sha256())
        deterministic = spec.kind in ("zero", "sign_flip")
        for trial_id, cond, s in plan:
            ws = sets[trial_id]
            h = set_hash(ws)
            if trial_id in done:
                if done[trial_id].get("set_hash") != h:
                    raise EsaError(f"{out_dir}: trial {trial_id} was run on another weight set; use --overwrite")
                continue
            earlier = next((r for r in done.values() if deterministic and r.get("condition") == cond
                            and r.get("set_hash") == h and "reused_from" not in r), None)
            t0 = time.perf_counter()
            if earlier is not None:
                record = dict(earlier, trial_id=trial_id, seed=s, reused_from=earlier["trial_id"], seconds=0.0)
            else:
                with perturbed(params, ws, spec, seed=control_seed(config.data.seed, s) if cond == "random_k"
                               else s) as applied:
                    result = evaluate(model, windows, batch_size=batch_size, description=trial_id)
                record = trial_record(trial_id, cond, s, result, time.perf_counter() - t0, set_hash=h,
                                 n_weights=applied.n_weights, bits_flipped=applied.bits_flipped,
                                 tensors_touched=len(applied.tensors), restore_verified=True)
            done[trial_id] = record
            append_jsonl(trials_path, record)
    if model_fingerprint(model) != fingerprint_before:
        raise RuntimeError("the model's weights changed during the trials: restoration failed")

    with timer.phase("statistics"):
        results = summarize(config, done, sets, plan, spec)
    atomic_write_json(out_dir / "results.json", results)
    if config.save_plots:
        from esa.plots import plot_delta_ppl

        plot_delta_ppl(results, out_dir / "plots" / "delta_ppl")
    extra = {**session.describe(), "model_fingerprint": fingerprint_before, "resumed": resuming}
    atomic_write_json(out_dir / MANIFEST, build_manifest(command, timer=timer, extra=extra))
    distributed.barrier()  # rank 0's files are complete before any rank goes on
    return {"out_dir": out_dir, "results": results, "session": session}
