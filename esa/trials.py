"""The causal trials of ``esa perturb`` (run by :mod:`esa.commands.perturb`): the selected weights against random_k
and bottom_k controls.

Protocol. The evaluation windows are the baseline's (same data flags, same seed). The trials: for every seed s,
the super set (the top-k set) and, when asked, bottom_k; then ``--control-sets N`` random_k sets, set j drawn
with a seed derived from (run seed ``--seed``, j) alone (:func:`control_seed`). Each trial perturbs its set in
place, evaluates every window (per-window NLL), restores bit-exactly (verified by fingerprints of the touched
tensors), and is appended to ``trials.jsonl`` at once. The weight set, not the window, is the unit of the
statistics (:mod:`esa.setstats`): the N random_k sets form the control distribution that the super set is ranked
against, so N costs N evaluations of the windows and sets the floor 1/(1 + N) of the rank p-value. bottom_k is
deterministic given a selection (the k lowest scores), so it has one set per selection (one per seed with
``--stability-check``, copies otherwise); it is ranked against the same random_k distribution. The sets themselves
are written to ``sets/`` before the first trial. Rerunning the same command resumes: finished trials are read
back (their weight-set hashes must match) and skipped. ``zero`` and ``sign_flip`` are deterministic, so a trial
whose set equals an earlier trial's set of the same condition reuses that result (``reused_from``) instead of
evaluating again.

Super sets: the top-k of ``--metric/--mode/--topk`` computed now, or read from ``--from-profile RUN_DIR``, or an
explicit list (``--weights FILE`` with columns tensor,row,col[,expert] or tensor,flat_index; ``--weights known``:
the published super weights of the model, from :mod:`esa.superweight_registry`). With
``--stability-check`` the super and bottom sets of seed s come from a seeded subset of the windows, and their
pairwise Jaccard is reported. Control set j is stratified (by default) like the super set of seed
``seeds[j mod len(seeds)]``.

Files: ``config.json``, ``sets/<condition>_seed<S>.csv`` and ``sets/random_k_set<J>.csv``, ``trials.jsonl``
(one JSON object per trial, the baseline first), ``results.json`` (:mod:`esa.stats`), ``plots/`` with
``--save-plots``, and ``experiment_manifest.json`` last.

Under torchrun (:mod:`esa.distributed`) every rank builds the same sets and applies the same perturbation to its
own copy of the model; each trial's windows are shared out by :func:`esa.evaluate.evaluate` and gathered, and rank
0 alone writes (and, when resuming, decides from ``trials.jsonl`` which trials remain).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch

from esa import stats
from esa.config import PerturbConfig, SelectionConfig
from esa.errors import EsaError
from esa.evaluate import EvalResult
from esa.perturbation import PerturbSpec
from esa.placement import weight_tensors
from esa.runio import atomic_write_json, finished_profile_run, read_csv_rows, read_json
from esa.scoreselect import score_and_select, seeded_selections
from esa.selection import WeightSet, jaccard, select_random
from esa.session import Session
from esa.tensors import describe_parameters, select_tensors
from esa.weightsfile import read_weights, write_weights
from esa.windows import stability_subset_size

KNOWN = "known"  # --weights known: the published super weights of the model (esa.superweight_registry)
TRIALS = "trials.jsonl"


def spec_of(config: PerturbConfig) -> PerturbSpec:
    return PerturbSpec(config.perturb, config.perturb_scale, config.perturb_prob, config.bits)


# ----------------------------------------------------------------------------------------------- weight sets
def set_hash(ws: WeightSet) -> str:
    h = hashlib.sha256()
    for name, idx in zip(ws.tensor, ws.flat_index.tolist()):
        h.update(f"{name}:{idx};".encode())
    return h.hexdigest()[:24]


def read_explicit_weights(path: Path, params: dict[str, torch.Tensor]) -> WeightSet:
    """``tensor,row,col[,expert]`` (storage coordinates) or ``tensor,flat_index`` rows → a weight set."""
    rows = read_csv_rows(path, required=("tensor",))
    if not rows:
        raise EsaError(f"--weights {path} lists no weights")
    names, flat = [], []
    for i, r in enumerate(rows, start=2):
        name = r["tensor"].strip()
        if name not in params:
            hint = f"{name}.weight" if f"{name}.weight" in params else None
            raise EsaError(f"--weights {path} line {i}: the model has no tensor {name!r}"
                           + (f" (did you mean {hint}?)" if hint else ""))
        shape = tuple(params[name].shape)
        try:
            if r.get("flat_index") not in (None, ""):
                idx = int(r["flat_index"])
            else:
                row, col = int(r["row"]), int(r["col"])
                expert = int(r["expert"]) if r.get("expert") not in (None, "") else 0
                if len(shape) < 2 or not (0 <= row < shape[-2] and 0 <= col < shape[-1]):
                    raise EsaError(f"--weights {path} line {i}: (row {row}, col {col}) is outside {name} {shape}")
                idx = (expert * shape[-2] + row) * shape[-1] + col
        except (KeyError, TypeError, ValueError):
            raise EsaError(f"--weights {path} line {i}: needs integer row,col or flat_index") from None
        if not 0 <= idx < params[name].numel():
            raise EsaError(f"--weights {path} line {i}: index {idx} is outside {name} {shape}")
        names.append(name)
        flat.append(idx)
    if len(set(zip(names, flat))) != len(names):
        raise EsaError(f"--weights {path} lists a weight twice")
    n = len(names)
    return WeightSet(names, np.array(flat, np.int64), np.full(n, np.nan), np.arange(n), "explicit")


def _profile_sets(run_dir: Path, seeds: list[int], stability: bool, model_id: str) -> tuple[dict, dict]:
    finished_profile_run(run_dir, model_id)
    if not stability:
        top, bottom = read_weights(run_dir / "top_weights.csv"), read_weights(run_dir / "bottom_weights.csv", "bottom_k")
        bottom.meta = read_json(run_dir / "metrics.json").get("bottom_k", {})
        return {s: top for s in seeds}, {s: bottom for s in seeds}
    tops, bottoms = {}, {}
    for s in seeds:
        path = run_dir / "stability" / f"top_weights_seed{s}.csv"
        if not path.exists():
            raise EsaError(f"--from-profile {run_dir} has no stability selection for seed {s}; rerun profile with "
                           f"--stability-check --seeds {','.join(map(str, seeds))}")
        tops[s] = read_weights(path)
        bottoms[s] = read_weights(run_dir / "stability" / f"bottom_weights_seed{s}.csv", "bottom_k")
    return tops, bottoms


def with_profile_selection(config: PerturbConfig) -> PerturbConfig:
    """``config`` with the selection settings of its ``--from-profile`` run, which are the ones that chose the
    sets (so config.json records what ran, not the command's defaults)."""
    run_dir = Path(config.from_profile)
    finished_profile_run(run_dir)
    saved = read_json(run_dir / "config.json").get("selection", {})
    return dataclasses.replace(config, selection=SelectionConfig(**saved))


def build_sets(config: PerturbConfig, session: Session, conditions: list[str]) -> dict[str, WeightSet]:
    """The weight set of every trial of :func:`trial_plan` (see the module docstring)."""
    model = session.loaded.model
    params = dict(model.named_parameters())
    sel = config.selection
    # Stratified random_k only needs the tensors of the top-k set; uniform random_k draws from the tensors that
    # the selection flags choose.
    infos = ([t for t, _ in describe_parameters(model)] if config.random_stratified else
             [t for t, _ in select_tensors(model, sel.include, sel.exclude, biases=sel.include_biases,
                                           norms=sel.include_norms)])
    if config.weights_file == KNOWN:
        from esa.superweight_registry import known_weight_set

        explicit = known_weight_set(session.loaded.model_id, params)
        tops, bottoms = {s: explicit for s in config.seeds}, {}
    elif config.weights_file:
        explicit = read_explicit_weights(Path(config.weights_file), params)
        tops, bottoms = {s: explicit for s in config.seeds}, {}
    elif config.from_profile:
        tops, bottoms = _profile_sets(Path(config.from_profile), config.seeds, config.stability_check,
                                      session.loaded.model_id)
    elif config.stability_check:
        chosen = seeded_selections(session, sel, config.seeds, config.stability_fraction,
                                   batch_size=config.data.batch_size)
        tops = {s: c.top for s, (c, _) in chosen.items()}
        bottoms = {s: c.bottom for s, (c, _) in chosen.items()}
    else:
        chosen, _ = score_and_select(session, sel, session.windows.input_ids, batch_size=config.data.batch_size,
                                     seed=config.data.seed)
        tops = {s: chosen.top for s in config.seeds}
        bottoms = {s: chosen.bottom for s in config.seeds}
    for ws in list(tops.values()) + list(bottoms.values()):
        for name in set(ws.tensor):
            if name not in params:
                raise EsaError(f"the model has no tensor {name!r} (named by the selection)")
    sets: dict[str, WeightSet] = {}
    for trial_id, cond, s in trial_plan(config, conditions):
        if cond == "super":
            sets[trial_id] = tops[s]
        elif cond == "bottom_k":
            sets[trial_id] = bottoms[s]
        else:  # control set s, stratified like the super set of one seed (the seeds taken in turn)
            reference = tops[config.seeds[s % len(config.seeds)]]
            sets[trial_id] = select_random(infos, reference, control_seed(config.data.seed, s),
                                           stratified=config.random_stratified)
    return sets


def control_seed(seed: int, index: int) -> int:
    """The seed of control set ``index``: derived from (run seed, set index) alone, so a resumed or repeated run
    draws the same sets and adding sets (a larger ``--control-sets``) keeps the earlier ones."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0])


def trial_plan(config: PerturbConfig, conditions: list[str]) -> list[tuple[str, str, int]]:
    """(trial id, condition, seed or control-set index) of every trial, in running order: per seed the super set
    (and bottom_k), then the ``--control-sets`` random_k sets."""
    plan = [(f"{c}/seed{s}", c, s) for s in config.seeds for c in conditions if c != "random_k"]
    if "random_k" in conditions:
        plan += [(f"random_k/set{j}", "random_k", j) for j in range(config.control_sets)]
    return plan


def _set_file(out_dir: Path, trial_id: str) -> Path:
    return out_dir / "sets" / f"{trial_id.replace('/', '_')}.csv"


def save_sets(out_dir: Path, sets: dict[str, WeightSet], model: torch.nn.Module) -> None:
    infos = [t for t, _ in describe_parameters(model)]
    params = weight_tensors(model, writable=False)  # offloaded weights: the copies accelerate keeps
    for trial_id, ws in sets.items():
        write_weights(_set_file(out_dir, trial_id), ws, infos, params)
    atomic_write_json(out_dir / "sets" / "meta.json", {trial_id: ws.meta for trial_id, ws in sets.items()})


def load_sets(out_dir: Path, plan: list[tuple[str, str, int]]) -> dict[str, WeightSet]:
    sets = {trial_id: read_weights(_set_file(out_dir, trial_id), cond) for trial_id, cond, _ in plan}
    meta = read_json(out_dir / "sets" / "meta.json") if (out_dir / "sets" / "meta.json").exists() else {}
    for trial_id, ws in sets.items():
        ws.meta = meta.get(trial_id, {})
    return sets


# ----------------------------------------------------------------------------------------------- trials
def trial_record(trial_id: str, condition: str, seed: int | None, result: EvalResult, seconds: float, **extra) -> dict:
    return {"trial_id": trial_id, "condition": condition, "seed": seed, "ppl": result.ppl, "mean_nll": result.mean_nll,
            "accuracy": result.accuracy, "finite": result.finite, "window_nll": result.nll.tolist(),
            "tokens": result.tokens.tolist(), "correct": result.correct.tolist(), "seconds": round(seconds, 3), **extra}


def _result_of(record: dict) -> EvalResult:
    return EvalResult(nll=np.array([float(x) for x in record["window_nll"]], dtype=np.float64),
                      tokens=np.array(record["tokens"], dtype=np.int64),
                      correct=np.array(record["correct"], dtype=np.int64))


def summarize(config: PerturbConfig, done: dict, sets: dict, plan: list[tuple[str, str, int]],
              spec: PerturbSpec) -> dict:
    base = done["baseline"]
    baseline = stats.Trial("baseline", -1, _result_of(base).nll, _result_of(base).tokens)
    trials = []
    for trial_id, cond, s in plan:
        r = done[trial_id]
        res = _result_of(r)
        trials.append(stats.Trial(cond, s, res.nll, res.tokens, int(r.get("bits_flipped", 0)),
                                  int(r.get("n_weights", 0)), set_id=r.get("set_hash", "")))
    out = stats.summarize_trials(baseline, trials, n_boot=config.n_bootstrap, seed=config.data.seed)
    out["perturbation"] = {"kind": spec.kind, "scale": spec.scale, "prob": spec.prob, "bits": spec.bits}
    out["seeds"] = config.seeds
    out["set_sizes"] = {c: len(sets[trial_id]) for trial_id, c, _ in reversed(plan)}
    out["control_sets"] = config.control_sets if "random_k" in config.controls else 0
    if any(c == "bottom_k" for _, c, _ in plan):  # zero-score weights that bottom_k left out, per seed
        out["bottom_k_unused_left_out"] = {str(s): sets[f"bottom_k/seed{s}"].meta.get("unused_left_out")
                                           for s in config.seeds}
    out["source"] = ("weights_file" if config.weights_file else "from_profile" if config.from_profile else "selection")
    if config.stability_check:
        supers = [sets[f"super/seed{s}"] for s in config.seeds]
        pairs = {f"{a}-{b}": jaccard(supers[i], supers[j]) for i, a in enumerate(config.seeds)
                 for j, b in enumerate(config.seeds) if i < j}
        out["stability"] = {"unit": "seed pair (a description of selection stability)",
                            "pairwise_jaccard": pairs, "mean_jaccard": float(np.mean(list(pairs.values())))}
        n_windows = len(base["window_nll"])
        if not config.from_profile and stability_subset_size(n_windows, config.stability_fraction) == n_windows:
            out["stability"]["warning"] = "every seed used all windows (too few windows): Jaccard is trivially 1"
    out["restore_verified"] = True
    return out
