"""Figures, each saved as PNG (for screens) and PDF (vector, for papers), atomically."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from esa.runio import atomic_write_bytes  # noqa: E402
from esa.weightsfile import weight_rows  # noqa: E402

FORMATS = ("png", "pdf")


def save(fig, path_stem: Path) -> list[Path]:
    """Write ``fig`` as ``<stem>.png`` and ``<stem>.pdf``; returns the paths."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=150, bbox_inches="tight")
        target = path_stem.with_suffix(f".{fmt}")
        atomic_write_bytes(target, buf.getvalue())
        paths.append(target)
    plt.close(fig)
    return paths


def plot_ccdf(curves: dict[str, tuple[np.ndarray, np.ndarray]], metric: str, path_stem: Path) -> list[Path]:
    """Log-log CCDF per component; ``curves`` maps component → (score x, P(score ≥ x)) (see esa.ccdf.ccdf_curves)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for comp in sorted(curves):
        x, p = curves[comp]
        if len(x):
            ax.loglog(x, p, lw=1.2, label=comp)
    ax.set_xlabel(f"score ({metric})")
    ax.set_ylabel("P(score ≥ x)")
    ax.set_title("Score distribution per component (log-log CCDF)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, ncol=2)
    return save(fig, path_stem)


def plot_heatmap(rows: list[tuple], value_index: int, title: str, path_stem: Path, cbar: str, *,
                 xlabel: str = "component") -> list[Path]:
    """``rows`` are locations.csv rows (layer, component, count, share, mass share), or the same with the expert
    in place of the component (``xlabel="expert"``)."""
    layers = sorted({r[0] for r in rows if r[0] != ""})
    has_edge = any(r[0] == "" for r in rows)
    ylabels = (["—"] if has_edge else []) + [str(x) for x in layers]
    comps = sorted({r[1] for r in rows})
    grid = np.zeros((len(ylabels), len(comps)))
    for r in rows:
        y = ylabels.index("—" if r[0] == "" else str(r[0]))
        grid[y, comps.index(r[1])] = r[value_index]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(comps) + 2), max(3, 0.3 * len(ylabels) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(comps)), comps, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer (— = outside the blocks)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=cbar)
    return save(fig, path_stem)


AXIS_NAMES = {"embed": ("row (token id)", "col (embedding dimension)"),
              "lm_head": ("row (token id)", "col (hidden dimension)")}
DEFAULT_AXES = ("row (output channel)", "col (input channel)")


def plot_top_locations(rows: list[tuple], path_stem: Path, n: int = 200) -> list[Path]:
    """The top weights as (input column, output row) points, one panel per tensor holding the most of them.

    ``rows`` are top_weights.csv rows (rank, tensor, layer, component, expert, row, col, flat_index, score, ...),
    row and col as integers; a column shared by several top weights shows up as a vertical line — the signature
    of a massive-activation channel feeding super weights. Rows of the embedding and of lm_head are token ids.
    """
    from matplotlib.ticker import MaxNLocator

    rows = rows[:n]
    counts: dict[str, int] = {}
    component: dict[str, str] = {}
    for r in rows:
        counts[r[1]] = counts.get(r[1], 0) + 1
        component[r[1]] = r[3]
    tensors = sorted(counts, key=lambda t: -counts[t])[:4]
    fig, axes = plt.subplots(1, max(1, len(tensors)), figsize=(4.4 * max(1, len(tensors)), 4.0), squeeze=False,
                             layout="constrained")
    for ax, name in zip(axes[0], tensors):
        pts = [(int(r[6]), int(r[5]), float(r[8])) for r in rows if r[1] == name and r[6] != ""]
        if pts:
            cols, rws, sc = zip(*pts)
            magnitude = np.abs(np.asarray(sc))  # signed metrics (taylor, obd) are sized by |score|
            size = 10 + 80 * magnitude / max(magnitude.max(), np.finfo(float).tiny)
            ax.scatter(cols, rws, s=size, alpha=0.7)
            for lim, values in ((ax.set_xlim, cols), (ax.set_ylim, rws)):  # at least a few whole indices in view
                pad = max(1.0, 0.06 * (max(values) - min(values)))
                lim(min(values) - pad, max(values) + pad)
        ax.set_title(f"{name.removesuffix('.weight')} ({counts[name]})", fontsize=8)
        ylabel, xlabel = AXIS_NAMES.get(component[name], DEFAULT_AXES)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # indices: never fractional ticks
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.tick_params(labelsize=8)
        ax.invert_yaxis()
    fig.suptitle(f"Locations of the top {len(rows)} weights (panel title: tensor and its count; size ∝ score)",
                 fontsize=10)
    return save(fig, path_stem)


def profile_plots(plot_dir: Path, selection, location_rows: list[tuple], curves: dict, *, metric: str) -> list[Path]:
    paths = plot_ccdf(curves, metric, plot_dir / "score_ccdf")
    paths += plot_heatmap(location_rows, 2, "Top-k weights per layer × component", plot_dir / "heatmap_topk_count",
                          "top-k count")
    paths += plot_heatmap(location_rows, 4, "Share of total score mass", plot_dir / "heatmap_score_mass", "share")
    top_rows = weight_rows(selection.top, selection.tensors, {})
    paths += plot_top_locations(top_rows, plot_dir / "top_locations")
    return paths


def plot_delta_ppl(results: dict, path_stem: Path) -> list[Path]:
    """ΔPPL per condition: pooled estimate with its 95% bootstrap CI, and one point per seed."""
    conds = list(results["conditions"])
    fig, ax = plt.subplots(figsize=(1.6 * len(conds) + 2.5, 4.2))
    for i, c in enumerate(conds):
        entry = results["conditions"][c]
        d = entry.get("delta_ppl")
        if d is None or not np.isfinite(d):
            ax.annotate("collapsed", (i, 0), ha="center", color="crimson")
            continue
        lo, hi = entry.get("ci95_delta_ppl", [d, d])
        ax.bar(i, d, color="#4c72b0" if c == "super" else "#999999", alpha=0.8)
        ax.errorbar(i, d, yerr=[[max(d - lo, 0)], [max(hi - d, 0)]], color="black", capsize=6)
        pts = [s["delta_ppl"] for s in entry["per_seed"] if s["finite"]]
        ax.scatter(np.full(len(pts), i) + np.linspace(-0.15, 0.15, max(len(pts), 1))[: len(pts)], pts,
                   color="black", s=14, zorder=3)
    ax.set_xticks(range(len(conds)), conds)
    ax.set_ylabel("ΔPPL (perturbed − baseline)")
    values = [abs(results["conditions"][c].get("delta_ppl") or 0) for c in conds]
    finite = [v for v in values if np.isfinite(v) and v > 0]
    if finite and max(finite) / max(min(finite), 1e-12) > 100:
        ax.set_yscale("symlog", linthresh=max(min(finite), 1e-3))
    kind = results.get("perturbation", {}).get("kind", "")
    ratio = results.get("effect_ratio", {}).get("value")
    title = f"{kind}: baseline PPL {results['baseline']['ppl']:.3g}"
    if ratio is not None and np.isfinite(ratio):
        title += f", effect ratio {ratio:.3g}"
    ax.set_title(title)
    ax.axhline(0, color="black", lw=0.6)
    ax.grid(True, axis="y", alpha=0.3)
    return save(fig, path_stem)


def plot_matrix(matrix: list[list[float]], labels: list[str], title: str, path_stem: Path) -> list[Path]:
    """A symmetric agreement matrix (e.g. overlap@k between runs) with each value written in its cell."""
    grid = np.asarray(matrix, dtype=float)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.1 * n + 3, 0.9 * n + 2))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if grid[i, j] < 0.6 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return save(fig, path_stem)
