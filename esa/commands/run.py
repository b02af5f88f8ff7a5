"""The runbook in one command: baseline → profile → perturb (when asked) → report, into one out-dir.

This is what ``esa run`` and the runbook's ``python phase1_runner_enhanced.py ...`` execute. It adds no
computation of its own: every phase is the library function behind the matching ``esa`` command, run on one
loaded model (loaded once), each into its own sub-directory::

    OUT/baseline/   esa baseline          OUT/perturb/   esa perturb --from-profile OUT/profile
    OUT/profile/    esa profile           OUT/report/    esa report OUT

Rerunning the same command resumes: a phase whose directory holds a finished run with the same configuration
is reused, an interrupted perturb run continues from its trials. A finished phase with another configuration is
refused unless ``--overwrite`` is given.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from esa import distributed
from esa.config import (BaselineConfig, PerturbConfig, ProfileConfig, RunbookConfig, resolve_attention,
                        resolve_seq_len, same_config, validate)
from esa.errors import EsaError
from esa.runio import is_finished, read_json

__all__ = ["RunbookConfig", "phase_configs", "plan", "resolve", "resolve_dataset", "run_runbook"]


def resolve_dataset(dataset: str, model: str | None, text_file: str | None) -> str:
    """``auto``: the embedded text for the embedded model (or with ``--text-file``), WikiText-2 for any other."""
    from esa.modeling import EMBEDDED_MODEL_ID

    if dataset != "auto":
        return dataset
    return "embedded" if model in (None, EMBEDDED_MODEL_ID) or text_file else "wikitext2"


def phase_configs(cfg: RunbookConfig) -> dict[str, object]:
    """The configuration of each phase, as ``esa baseline/profile/perturb`` would receive it.

    ``cfg`` is resolved (:func:`resolve`), so every phase records the same dataset, sequence length and
    attention implementation.
    """
    out = Path(cfg.out_dir)
    configs: dict[str, object] = {
        "baseline": BaselineConfig(model=cfg.model, data=cfg.data, out_dir=str(out / "baseline"),
                                   overwrite=cfg.overwrite),
        "profile": ProfileConfig(model=cfg.model, data=cfg.data, selection=cfg.selection, seeds=cfg.seeds,
                                 stability_check=cfg.stability_check, stability_fraction=cfg.stability_fraction,
                                 save_scores=cfg.save_scores, save_plots=cfg.save_plots,
                                 out_dir=str(out / "profile"), overwrite=cfg.overwrite),
    }
    if cfg.perturb is not None:
        configs["perturb"] = PerturbConfig(
            model=cfg.model, data=cfg.data, selection=cfg.selection, perturb=cfg.perturb,
            perturb_scale=cfg.perturb_scale, perturb_prob=cfg.perturb_prob, bits=cfg.bits, controls=cfg.controls,
            seeds=cfg.seeds, from_profile=str(out / "profile"), stability_check=cfg.stability_check,
            stability_fraction=cfg.stability_fraction, random_stratified=cfg.random_stratified,
            control_sets=cfg.control_sets, n_bootstrap=cfg.n_bootstrap, save_plots=cfg.save_plots,
            out_dir=str(out / "perturb"), overwrite=cfg.overwrite)
    return configs


def same_finished_run(run_dir: Path, config: object) -> bool:
    """True when ``run_dir`` holds a finished run of exactly ``config`` (paths, plots and overwrite aside)."""
    if not is_finished(run_dir) or not (run_dir / "config.json").exists():
        return False
    return same_config(read_json(run_dir / "config.json"), config,
                       ignore=("overwrite", "save_plots", "out_dir", "from_profile"))


def resolve(cfg: RunbookConfig) -> RunbookConfig:
    """``cfg`` with what loading the model would decide filled in, so that a rerun compares like with like
    before loading it: the dataset (``auto``), the default sequence length (from the model's config alone),
    eager attention for second-order metrics and the batch size from the plan
    (:func:`esa.planning.with_planned_batch_size`). ``cfg`` itself is not changed."""
    from esa.modeling import model_context
    from esa.planning import with_planned_batch_size

    m = cfg.model
    data = replace(cfg.data, dataset=resolve_dataset(cfg.data.dataset, m.model, cfg.data.text_file))
    if data.seq_len is None:
        data = resolve_seq_len(data, model_context(m.model, revision=m.revision, trust_remote_code=m.trust_remote_code))
    data = with_planned_batch_size(m, cfg.selection, data, command="run")
    return replace(cfg, model=resolve_attention(m, [cfg.selection.metric]), data=data)


def plan(cfg: RunbookConfig, configs: dict[str, object]) -> dict[str, str]:
    """Per phase: "run", "reuse", or "redo" (a finished perturb run whose profile is being redone: its selection
    is stale, so it is replaced). A finished phase with another configuration is refused unless --overwrite."""
    decisions = {}
    for name, config in configs.items():
        run_dir = Path(config.out_dir)
        if not cfg.overwrite and same_finished_run(run_dir, config):
            decisions[name] = "reuse"
        elif not cfg.overwrite and is_finished(run_dir):
            raise EsaError(f"{run_dir} holds a finished {name} run with another configuration; pass --overwrite to "
                           "replace it or choose another --out-dir")
        else:
            decisions[name] = "run"
    if decisions.get("profile") == "run" and decisions.get("perturb") == "reuse":
        decisions["perturb"] = "redo"
    return decisions


def run_runbook(cfg: RunbookConfig, *, announce: Callable[[str], None] = print,
                finished: Callable[[str, object], None] | None = None) -> dict:
    """Run (or reuse) every phase, then write the report; returns {phase: result dict or None}.

    ``announce`` gets a line as each phase starts, ``finished(phase, result)`` each phase's result as it ends (so
    that what is printed about a phase follows its announcement)."""
    from esa.commands.baseline import run_baseline
    from esa.commands.profile import run_profile
    from esa.reporting import write_report
    from esa.scoreselect import open_for_selection
    from esa.commands.perturb import run_perturb

    validate(cfg)
    cfg = resolve(cfg)
    configs = phase_configs(cfg)
    for config in configs.values():
        validate(config)
    decisions = plan(cfg, configs)
    results: dict[str, object] = {}
    session = None
    runners = {"baseline": run_baseline, "profile": run_profile, "perturb": run_perturb}
    for name, config in configs.items():
        if decisions[name] == "reuse":
            plots = Path(config.out_dir) / "plots"
            missing_plots = getattr(config, "save_plots", False) and not plots.exists()
            announce(f"{name}: reusing the finished run in {config.out_dir}"
                     + (" (it has no plots; pass --overwrite to redo it with them)" if missing_plots else ""))
            results[name] = None
            continue
        if decisions[name] == "redo":
            announce(f"{name}: the profile is being redone, so its finished run in {config.out_dir} is replaced")
            config = replace(config, overwrite=True)
        if session is None:
            session = open_for_selection(cfg.model, cfg.data, cfg.selection)  # one load for every phase
        announce(f"{name}: running into {config.out_dir}")
        results[name] = runners[name](config, session=session, command=f"run:{name}")
        if finished is not None:
            finished(name, results[name])
    report_dir = Path(cfg.out_dir) / "report"
    announce(f"report: writing {report_dir}")
    # The runbook's report is derived from its phases, so it is always redrawn from them. Under torchrun rank 0
    # alone draws it: the HTML embeds the figures read back from disk, which only rank 0 writes. The broadcast
    # hands its summary to every rank once the report is complete.
    summary = write_report([Path(c.out_dir) for c in configs.values()], report_dir, overwrite=True) \
        if distributed.is_main() else None
    results["report"] = distributed.broadcast(summary)
    return results
