"""The report section "Which metric predicts the true effect?", from ``esa validate`` runs (validate.json)."""

from __future__ import annotations

import shutil
from pathlib import Path

from esa.reporting.collect import Run
from esa.reporting.tables import Table, fmt

TITLE = "Which metric predicts the true effect?"


def _ci(ci: list | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "—"


def validate_table(run: Run) -> Table:
    """One row per metric: rank correlations with |ΔNLL| and signed ΔNLL, precision@k, with bootstrap CIs."""
    s = run.data
    k = s.get("precision_k")
    rows = []
    for metric, f in s.get("metrics", {}).items():
        rows.append([metric, fmt(f["spearman_abs"]), _ci(f["spearman_abs_ci95"]), fmt(f["kendall_abs"]),
                     fmt(f["spearman_signed"]), _ci(f["spearman_signed_ci95"]), fmt(f["kendall_signed"]),
                     fmt(f["precision_at_k"]), _ci(f["precision_at_k_ci95"]), fmt(f.get("own_topk_mean_abs_delta_nll"))])
    note = (f"Exact {s.get('perturb')} ablation of {fmt(s.get('n_sample'))} seeded, tensor-stratified weights, one at "
            f"a time (ΔNLL in nats per token, perturbed minus intact); statistics over the sample, 95% percentile "
            f"bootstrap CIs. Signed metrics enter the |ΔNLL| columns by |score|. The last column is the mean |ΔNLL| of "
            f"each metric's own global top-k.")
    return Table(f"validate_{run.key}", f"{TITLE} — {run.label}",
                 ["metric", "Spearman |Δ|", "95% CI", "Kendall |Δ|", "Spearman signed", "95% CI", "Kendall signed",
                  f"precision@{k}", "95% CI", "own top-k mean |ΔNLL|"], rows, note=note)


def validate_figures(runs: list[Run], fig_dir: Path) -> list[tuple[str, Path]]:
    """The runs' own scatter plots (score vs |ΔNLL|), copied next to the report's other figures."""
    figures = []
    for r in runs:
        for metric in r.data.get("metrics", {}):
            src = r.dir / "plots" / f"scatter_{metric}.png"
            if src.exists():
                dst = fig_dir / f"validate_{r.key}_{metric}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                figures.append((f"|{metric}| vs true |ΔNLL| of single-weight ablations — {r.label}", dst))
    return figures
