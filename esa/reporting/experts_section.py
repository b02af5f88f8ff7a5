"""The report's per-expert part, from a mixture-of-experts profile run's ``experts.csv`` (:mod:`esa.experts`).

Does one expert hold the sensitive weights (a "super expert", Su et al. 2025)? Per layer with E experts, an
expert's ``layer_mass_share`` is 1/E when the score mass is spread evenly; ``× even`` = E · layer_mass_share
says how far above that an expert stands. The table lists the experts holding the most top-k weights; the
heatmaps show top-k counts and layer mass shares over layer × expert.
"""

from __future__ import annotations

from pathlib import Path

from esa.reporting.collect import Run
from esa.reporting.tables import Table, fmt
from esa.runio import read_csv_rows

ROWS = 10


def expert_rows(run: Run) -> list[dict] | None:
    """experts.csv as numbers, or None when the run has none (a dense model, or no expert tensor scored)."""
    path = run.dir / "experts.csv"
    if not path.exists():
        return None
    rows = read_csv_rows(path, required=("layer", "expert", "topk_count", "topk_share", "score_mass_share",
                                         "layer_mass_share"))
    return [{"layer": r["layer"], "expert": int(r["expert"]), "topk_count": int(r["topk_count"]),
             "topk_share": float(r["topk_share"]), "score_mass_share": float(r["score_mass_share"]),
             "layer_mass_share": float(r["layer_mass_share"])} for r in rows]


def experts_table(run: Run) -> Table | None:
    """The experts with the most top-k weights (then the most score mass), at most ``ROWS`` of them."""
    rows = expert_rows(run)
    if not rows:
        return None
    per_layer: dict[str, int] = {}
    for r in rows:
        per_layer[r["layer"]] = per_layer.get(r["layer"], 0) + 1
    ranked = sorted(rows, key=lambda r: (-r["topk_count"], -r["layer_mass_share"]))[:ROWS]
    body = [[r["layer"], str(r["expert"]), fmt(r["topk_count"]), fmt(r["topk_share"]), fmt(r["score_mass_share"]),
             fmt(r["layer_mass_share"]), fmt(r["layer_mass_share"] * per_layer[r["layer"]])] for r in ranked]
    return Table(f"experts_{run.key}", f"Experts holding the most top-k weights — {run.label} "
                 f"({run.data.get('metric')})",
                 ["layer", "expert", "top-k count", "share of top-k", "share of score mass",
                  "share of the layer's expert mass", "× even"], body,
                 note="× even: the expert's share of its layer's expert score mass times the number of experts "
                      "(1 when every expert holds the same mass; far above 1: a candidate super expert). "
                      "experts.csv in the run has every expert.", align=["r"] * 7)


def experts_figures(run: Run, fig_dir: Path) -> list[tuple[str, Path]]:
    """Layer × expert heatmaps of top-k counts and of layer mass shares (none without experts.csv)."""
    rows = expert_rows(run)
    if not rows:
        return []
    from esa import plots

    width = len(str(max(r["expert"] for r in rows)))
    grid = [("" if r["layer"] == "" else int(r["layer"]), f"{r['expert']:0{width}d}", r["topk_count"],
             r["topk_share"], r["layer_mass_share"]) for r in rows]
    count, mass = fig_dir / f"experts_count_{run.key}", fig_dir / f"experts_mass_{run.key}"
    plots.plot_heatmap(grid, 2, f"Top-k per layer × expert — {run.label}", count, "top-k count", xlabel="expert")
    plots.plot_heatmap(grid, 4, f"Score mass per layer × expert — {run.label}", mass,
                       "share of the layer's expert mass", xlabel="expert")
    return [(f"Top-k counts per layer × expert — {run.label}", count.with_suffix(".png")),
            (f"Share of each layer's expert score mass per expert — {run.label}", mass.with_suffix(".png"))]
