"""``esa report``: turn finished run directories into one report, from their files alone (no model is loaded).

Written into ``--out`` (atomically, file by file):
- ``report.html``: self-contained (figures embedded as PNG data), for a browser;
- ``report.md`` with ``figures/*.png`` beside it, for a repository or a notebook;
- ``figures/*.png`` and ``figures/*.pdf`` (vector, for a paper);
- ``tables.tex``: every table as a LaTeX ``table`` (needs ``\\usepackage{booktabs,graphicx}``);
- ``checklist.json``: the evidence checklist (:mod:`esa.reporting.checklist`) with each measured value;
- ``report.json``: the runs read, the cross-metric comparison and the checklist counts.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from esa.reporting import checklist as cl
from esa.reporting.collect import Collection, Run, collect
from esa.reporting.experts_section import experts_figures, experts_table
from esa.reporting.tables import Table, fmt, to_html, to_latex, to_markdown
from esa.errors import EsaError
from esa.runio import atomic_write_json, atomic_write_text, check_writable, read_csv_rows
from esa.weightsfile import top_location_rows


# ----------------------------------------------------------------------------------------------- analysis
def _comparable_selection(run: Run) -> str:
    """What must be equal for two profile runs' top-k sets to be compared: the model, the data, and every
    selection setting except the metric (mode, k, tensors)."""
    import json

    sel = {k: v for k, v in run.config.get("selection", {}).items() if k != "metric"}
    return json.dumps([run.model_id, run.config.get("data"), sel], sort_keys=True, default=str)


def cross_metric(profiles: list[Run]) -> dict | None:
    """Agreement of the top-k sets of different metrics (esa.agreement), over comparable runs only.

    Profile runs are grouped by model, data and selection settings other than the metric; the group with the
    most metrics is compared, one run per metric (the first by label), so repeated runs of one metric do not
    weigh the mean. None when no group has two metrics.
    """
    from esa.agreement import compare_runs

    groups: dict[str, dict[str, Run]] = defaultdict(dict)
    for r in sorted(profiles, key=lambda r: r.label):
        groups[_comparable_selection(r)].setdefault(r.data.get("metric"), r)
    best = max(groups.values(), key=len, default={})
    if len(best) < 2:
        return None
    runs = list(best.values())
    result = compare_runs([r.dir for r in runs])
    label_of = {str(r.dir): r.label for r in runs}
    metric_of = {str(r.dir): r.data.get("metric") for r in runs}
    for p in result["pairs"]:
        p["a_metric"], p["b_metric"] = metric_of[p["a_dir"]], metric_of[p["b_dir"]]
        p["a"], p["b"] = label_of[p.pop("a_dir")], label_of[p.pop("b_dir")]  # no machine-specific paths
        p["shared_factors"] = sorted(cl.shared_factors(p["a_metric"], p["b_metric"]))
    for r in result["runs"]:
        r["dir"] = label_of[r["dir"]]
    result["labels"] = [r.label for r in runs]
    return result


def evaluate_checklist(col: Collection, comparison: dict | None) -> list[cl.Criterion]:
    """Every criterion the runs provide, then a "not measured" row for each one none of them does."""
    criteria: list[cl.Criterion] = []
    for r in col.of("perturb"):
        criteria += cl.perturb_criteria(r.label, r.data, r.config)
    if comparison is not None:
        criteria.append(cl.overlap_criterion(comparison))
    for r in col.of("profile"):
        criteria += cl.profile_criteria(r.label, r.data, r.stability)
    for r in col.of("baseline"):
        criteria += cl.baseline_criteria(r.label, r.data)
    criteria += cl.not_measured(criteria)
    cl.apply_holm(criteria)
    order = list(cl.NEEDS)
    evidence = sorted((c for c in criteria if c.group == "evidence"), key=lambda c: order.index(c.name))
    technical = [c for c in criteria if c.group == "technical"]
    return evidence + technical


# ----------------------------------------------------------------------------------------------- tables
def baseline_table(runs: list[Run]) -> Table:
    rows = []
    for r in runs:
        m, model, w = r.data, r.manifest.get("model", {}), r.manifest.get("windows", {})
        rows.append([r.label, str(model.get("model_id")), str(r.manifest.get("dataset", {}).get("dataset")),
                     f"{w.get('n_windows')} × {w.get('seq_len')}", fmt(m.get("tokens")), fmt(m.get("ppl")),
                     fmt(m.get("mean_nll")), fmt(m.get("accuracy")), fmt(m.get("uniform_guess_ppl")),
                     "LEAK SUSPECTED" if m.get("leak_warnings") else "no"])
    return Table("baseline", "Perplexity, loss and next-token accuracy on the evaluation windows", ["run", "model", "dataset", "windows × seq_len", "tokens", "PPL",
                                          "NLL (nats/token)", "accuracy", "uniform-guess PPL", "leak"], rows,
                 align=["l", "l", "l", "r", "r", "r", "r", "r", "r", "l"])


def tail_table(runs: list[Run]) -> Table:
    rows = []
    for r in runs:
        m = r.data
        rows.append([r.label, m.get("metric"), m.get("mode"), fmt(m.get("topk")), fmt(m.get("scored_weights")),
                     fmt(m.get("topk_mass_share")), fmt(m.get("max_over_mean")), fmt(m.get("excess_kurtosis")),
                     fmt(m.get("gini")), fmt(m.get("hill_alpha")), str(m.get("best_tail_fit")),
                     fmt(m.get("topk_share_embed")), fmt(m.get("topk_share_lm_head")),
                     fmt(m.get("stability_mean_jaccard"))])
    return Table("heavy_tail", "Score distributions (per profile run, whole model)",
                 ["run", "metric", "mode", "k", "scored weights", "top-k mass share", "max/mean", "excess kurtosis",
                  "Gini", "Hill α", "best tail fit", "top-k in embed", "top-k in lm_head", "Jaccard across seeds"],
                 rows, note="best tail fit: likelihood-ratio comparison of power-law, exponential and lognormal "
                            "fits of the top scores (tensor_stats.csv has the per-tensor values)",
                 align=["l", "l", "l"] + ["r"] * 7 + ["l"] + ["r"] * 3)


def top_weights_table(run: Run, n: int = 10) -> Table:
    """The first ``n`` rows of top_weights.csv; an ``expert`` column when one of them sits in an expert."""
    top = read_csv_rows(run.dir / "top_weights.csv")[:n]
    experts = any(r.get("expert", "") != "" for r in top)
    rows = [[r["rank"], r["tensor"], r["layer"], r["component"], *([r["expert"]] if experts else []), r["row"],
             r["col"], fmt(float(r["score"])), fmt(float(r["weight"]))] for r in top]
    return Table(f"top_{run.key}", f"Top {len(rows)} weights — {run.label} ({run.data.get('metric')}, "
                 f"{run.data.get('mode')})", ["rank", "tensor", "layer", "component", *(["expert"] if experts else []),
                                              "row", "col", "score", "weight"],
                 rows, align=["r", "l", "r", "l", *(["r"] if experts else []), "r", "r", "r", "r"])


def overlap_table(comparison: dict) -> Table:
    rows = [[p["a"], p["b"], fmt(p["overlap_at_k"]), fmt(p["jaccard"]), fmt(p["spearman"]), p["basis"]]
            for p in comparison["pairs"]]
    return Table("overlap", "Cross-metric agreement of the top-k sets",
                 ["run A", "run B", "overlap@k", "Jaccard", "Spearman ρ", "ρ basis"], rows,
                 align=["l", "l", "r", "r", "r", "l"])


def stability_table(col: Collection) -> Table | None:
    rows = []
    for r in col.of("profile"):
        if r.stability:
            pairs = ", ".join(f"{k}: {v:.3f}" for k, v in r.stability["pairwise_jaccard"].items())
            rows.append([r.label, r.data.get("metric"), fmt(r.stability.get("windows_per_seed")), pairs,
                         fmt(r.stability["mean_jaccard"])])
    for r in col.of("perturb"):
        if "stability" in r.data and r.data.get("source") != "from_profile":
            pairs = ", ".join(f"{k}: {v:.3f}" for k, v in r.data["stability"]["pairwise_jaccard"].items())
            rows.append([r.label, "(selection of the perturb run)", "", pairs, fmt(r.data["stability"]["mean_jaccard"])])
    if not rows:
        return None
    return Table("stability", "Top-k Jaccard across seeds (selections on seeded subsets of the windows)",
                 ["run", "metric", "windows per seed", "pairwise Jaccard", "mean"], rows,
                 align=["l", "l", "r", "l", "r"])


def perturb_table(runs: list[Run]) -> Table:
    rows = []
    for r in runs:
        spec = r.data.get("perturbation", {})
        kind = spec.get("kind", "?") + (f" s={spec['scale']:g}" if spec.get("kind") in ("sign_flip", "gauss_noise")
                                        else f" p={spec['prob']:g}" if spec.get("kind") == "bit_flip" else "")
        for cond, c in r.data.get("conditions", {}).items():
            ci = c.get("ci95_delta_ppl")
            level = c.get("set_level", {})
            sci = level.get("ci95_mean_delta_nll_per_token")
            rows.append([r.label, kind, cond, fmt(c.get("n_weights")), fmt(level.get("n_sets")),
                         fmt(level.get("mean_delta_nll_per_token")),
                         f"[{fmt(sci[0], 3)}, {fmt(sci[1], 3)}]" if sci else "not available",
                         fmt(c.get("ppl")), fmt(c.get("delta_ppl")),
                         f"[{fmt(ci[0], 3)}, {fmt(ci[1], 3)}]" if ci else "—",
                         f"{c.get('n_collapsed', 0)}/{c.get('n_trials', 0)}"])
    return Table("perturbation", "Perturbation trials per condition",
                 ["run", "perturbation", "condition", "weights", "sets", "mean ΔNLL (nats/token)",
                  "95% CI (sets, then windows)", "PPL", "pooled ΔPPL", "95% CI given these sets", "collapsed"], rows,
                 note="mean ΔNLL: mean over the condition's weight sets (unit: weight set; a collapsed set counts as "
                      "+∞); its CI resamples sets, then windows (a condition with one distinct set: windows only). "
                      "Pooled ΔPPL and its CI resample windows only: they describe these sets, not sets in general.",
                 align=["l", "l", "l"] + ["r"] * 8)


def tests_table(runs: list[Run]) -> Table:
    rows = []
    for r in runs:
        for key, t in r.data.get("tests", {}).items():
            window = t.get("per_window", t)  # runs before set-level statistics kept the paired tests at the top
            rows.append([r.label, key.replace("_vs_", " vs "), t.get("unit", "not available"),
                         fmt(t.get("n_control_sets")), fmt(t.get("p_value")),
                         fmt(t.get("parametric", {}).get("p_value")), fmt(window.get("p_paired_t")),
                         fmt(window.get("p_wilcoxon")), fmt(window.get("effect_size_dz"))])
        ratio = r.data.get("effect_ratio", {})
        ci = ratio.get("ci95")
        rows.append([r.label, "effect ratio ΔNLL super / random_k", ratio.get("unit", "not available"), "",
                     f"ratio {fmt(ratio.get('value'))}", f"lower bound {fmt(ratio.get('lower_bound_95'))}",
                     f"CI [{fmt(ci[0], 3)}, {fmt(ci[1], 3)}]" if ci else "—", "", ""])
    return Table("tests", "Significance (one-sided: super hurts more than random_k sets; bottom_k hurts less)",
                 ["run", "comparison", "unit", "control sets", "rank p", "parametric p",
                  "paired t p (windows)", "Wilcoxon p (windows)", "d_z (windows)"], rows,
                 note="rank p: Monte Carlo rank test of the tested set's ΔNLL among the random_k control sets "
                      "(unit: weight set; evidence); parametric p: prediction-interval t-test on ΔNLL across sets "
                      "(secondary); paired tests: n = evaluation windows, given these weight sets (description "
                      "only). Effect ratio: lower bound by rank-test inversion (unit: weight set); CI resamples "
                      "sets, then windows.", align=["l", "l", "l", "r", "r", "r", "r", "r", "r"])


def checklist_table(criteria: list[cl.Criterion]) -> Table:
    rows = [[c.group, c.name, c.run or "all", fmt(c.value) if not isinstance(c.value, str) else c.value,
             c.unit or "—", c.threshold, c.status, c.detail] for c in criteria]
    return Table("checklist", "Each criterion: what was measured, its unit, the threshold, the verdict",
                 ["group", "criterion", "run", "measured", "unit", "threshold", "status", "detail"], rows,
                 status_column=6, align=["l", "l", "l", "r", "l", "l", "l", "l"])


def environment_table(col: Collection) -> Table:
    rows = []
    for r in col.runs:
        m = r.manifest
        git = m.get("git", {})
        hw = m.get("hardware", {})
        device = ", ".join(hw.get("gpus") or []) or f"CPU ({hw.get('cpu_count')} cores)"
        kernels = m.get("kernels", {})
        rows.append([r.label, str(m.get("esa_command")), str(m.get("created_utc")),
                     f"{str(git.get('sha'))[:10]}{' (dirty)' if git.get('dirty') else ''}",
                     str(m.get("packages", {}).get("torch")), str(m.get("packages", {}).get("transformers")),
                     device, str(kernels.get("backend", kernels.get("ESA_KERNELS", "—"))),
                     fmt(m.get("timings_s", {}).get("total"))])
    return Table("environment", "Environment (from each run's experiment_manifest.json)",
                 ["run", "command", "created (UTC)", "git", "torch", "transformers", "device", "kernels", "seconds"],
                 rows, align=["l"] * 8 + ["r"])


# ----------------------------------------------------------------------------------------------- figures
def make_figures(col: Collection, comparison: dict | None, fig_dir: Path) -> list[tuple[str, Path]]:
    """(caption, PNG path) of every figure drawn from the run files (a PDF is written beside each PNG)."""
    from esa import plots
    from esa.ccdf import read_ccdf

    figures: list[tuple[str, Path]] = []
    for r in col.of("profile"):
        key, metric = r.key, r.data.get("metric", "score")
        if (r.dir / "ccdf.csv").exists():
            plots.plot_ccdf(read_ccdf(r.dir / "ccdf.csv"), metric, fig_dir / f"ccdf_{key}")
            figures.append((f"Score CCDF per component — {r.label} ({metric})", fig_dir / f"ccdf_{key}.png"))
        rows = [("" if x["layer"] == "" else int(x["layer"]), x["component"], int(x["topk_count"]),
                 float(x["topk_share"]), float(x["score_mass_share"])) for x in read_csv_rows(r.dir / "locations.csv")]
        plots.plot_heatmap(rows, 2, f"Top-k per layer × component — {r.label}", fig_dir / f"heatmap_count_{key}",
                           "top-k count")
        plots.plot_heatmap(rows, 4, f"Score mass per layer × component — {r.label}", fig_dir / f"heatmap_mass_{key}",
                           "share")
        figures.append((f"Top-k counts per layer × component — {r.label}", fig_dir / f"heatmap_count_{key}.png"))
        figures.append((f"Share of score mass per layer × component — {r.label}", fig_dir / f"heatmap_mass_{key}.png"))
        plots.plot_top_locations(top_location_rows(r.dir / "top_weights.csv"), fig_dir / f"top_locations_{key}")
        figures.append((f"Where the top weights sit (row × column per tensor) — {r.label}",
                        fig_dir / f"top_locations_{key}.png"))
        figures += experts_figures(r, fig_dir)  # mixture-of-experts runs only
    if comparison is not None:
        plots.plot_matrix(comparison["overlap_at_k"], comparison["labels"], "Top-k overlap@k between profile runs",
                          fig_dir / "overlap_matrix")
        figures.append(("Cross-metric overlap@k matrix", fig_dir / "overlap_matrix.png"))
    if col.of("validate"):
        from esa.reporting.validate_section import validate_figures

        figures += validate_figures(col.of("validate"), fig_dir)
    for r in col.of("perturb"):
        key = r.key
        plots.plot_delta_ppl(r.data, fig_dir / f"delta_ppl_{key}")
        figures.append((f"ΔPPL per condition with 95% CI and per-seed points — {r.label}",
                        fig_dir / f"delta_ppl_{key}.png"))
    return figures


# ----------------------------------------------------------------------------------------------- documents
STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}caption{text-align:left;font-weight:600;padding:4px 0}
th,td{border-bottom:1px solid #ddd;padding:3px 8px}th{background:#f4f4f4}td.r,th.r{text-align:right}
td.status-met{color:#1a7f37;font-weight:600}td.status-not-met{color:#cf222e;font-weight:600}
td.status-not-measured,td.status-not-applicable{color:#888}td.status-not-informative{color:#9a6700}
.figures{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:1.5em;
align-items:start}figure{margin:0}figure.wide{grid-column:1/-1}figure img{max-width:100%;height:auto}
figcaption{font-size:12px;color:#555}.note{font-size:12px;color:#555}"""


def _sections(col: Collection, comparison: dict | None, criteria: list[cl.Criterion]) -> list[tuple[str, list[Table]]]:
    sections = [("Evidence checklist", [checklist_table(criteria)])]
    if col.of("baseline"):
        sections.append(("Baseline", [baseline_table(col.of("baseline"))]))
    if col.of("profile"):
        experts = [t for t in map(experts_table, col.of("profile")) if t is not None]  # mixture-of-experts runs
        sections.append(("Sensitivity profiles", [tail_table(col.of("profile"))]
                         + [top_weights_table(r) for r in col.of("profile")] + experts))
    agreement = ([overlap_table(comparison)] if comparison else []) + [t for t in [stability_table(col)] if t]
    if agreement:
        sections.append(("Agreement across metrics and seeds", agreement))
    if col.of("perturb"):
        sections.append(("Perturbations", [perturb_table(col.of("perturb")), tests_table(col.of("perturb"))]))
    if col.of("validate"):
        from esa.reporting.validate_section import TITLE, validate_table

        sections.append((TITLE, [validate_table(r) for r in col.of("validate")]))
    sections.append(("Environment", [environment_table(col)]))
    return sections


def _summary_line(criteria: list[cl.Criterion]) -> str:
    counts = cl.summarize(criteria)["counts"]
    return ", ".join(f"{counts[s]} {s}" for s in cl.STATUSES if counts[s] or s in (cl.MET, cl.NOT_MET))


def render_markdown(sections, figures, criteria, col: Collection, out_dir: Path) -> str:
    parts = [f"# esa report\n\nGenerated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {len(col.runs)} runs. "
             f"Checklist: {_summary_line(criteria)}.\n"]
    if col.skipped:
        parts.append("Left out: " + "; ".join(col.skipped) + "\n")
    for title, tables in sections:
        parts.append(f"## {title}\n")
        parts += [to_markdown(t) for t in tables]
    if figures:
        parts.append("## Figures\n")
        parts += [f"![{cap}]({png.relative_to(out_dir).as_posix()})\n\n*{cap}*\n" for cap, png in figures]
    return "\n".join(parts)


WIDE_FIGURES = ("top_locations",)  # figures with several panels side by side


def render_html(sections, figures, criteria, col: Collection) -> str:
    body = [f"<h1>esa report</h1><p>Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {len(col.runs)} "
            f"runs. Checklist: <b>{html.escape(_summary_line(criteria))}</b>.</p>"]
    if col.skipped:
        body.append(f"<p class=note>Left out: {html.escape('; '.join(col.skipped))}</p>")
    for title, tables in sections:
        body.append(f"<h2>{html.escape(title)}</h2>")
        body += [to_html(t) for t in tables]
    if figures:
        body.append('<h2>Figures</h2><div class="figures">')
        for cap, png in figures:
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            wide = " class=wide" if png.name.startswith(WIDE_FIGURES) else ""  # multi-panel: the full width
            body.append(f'<figure{wide}><img src="data:image/png;base64,{data}" alt="{html.escape(cap)}">'
                        f"<figcaption>{html.escape(cap)}</figcaption></figure>")
        body.append("</div>")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>esa report</title><style>{STYLE}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


REPORT_FILES = ("report.html", "report.md", "report.json", "checklist.json", "tables.tex")


def check_report_dir(out_dir: Path, *, overwrite: bool) -> None:
    """A report already in ``out_dir`` is replaced only with ``overwrite`` (as every command treats its results)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise EsaError(f"--out {out_dir} exists and is not a directory")
    check_writable(out_dir, "--out")
    existing = [name for name in REPORT_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise EsaError(f"{out_dir} already holds a report ({existing[0]}); pass --overwrite to replace it or choose "
                       "another --out")


def write_report(run_dirs: list[Path], out_dir: Path, *, overwrite: bool = False) -> dict:
    """Read the runs, evaluate the checklist, draw the figures and write every report file; returns report.json.

    An existing report in ``out_dir`` is refused unless ``overwrite``."""
    out_dir = Path(out_dir)
    check_report_dir(out_dir, overwrite=overwrite)
    col = collect(run_dirs)
    comparison = cross_metric(col.of("profile"))
    criteria = evaluate_checklist(col, comparison)
    sections = _sections(col, comparison, criteria)
    figures = make_figures(col, comparison, out_dir / "figures")
    atomic_write_text(out_dir / "tables.tex", "% esa report tables; needs \\usepackage{booktabs,graphicx}\n\n"
                      + "\n".join(to_latex(t) for _, tables in sections for t in tables))
    atomic_write_json(out_dir / "checklist.json", cl.summarize(criteria))
    atomic_write_text(out_dir / "report.md", render_markdown(sections, figures, criteria, col, out_dir))
    atomic_write_text(out_dir / "report.html", render_html(sections, figures, criteria, col))
    summary = {"runs": [{"kind": r.kind, "label": r.label} for r in col.runs], "skipped": col.skipped,
               "comparison": comparison, "checklist_counts": cl.summarize(criteria)["counts"],
               "figures": [png.relative_to(out_dir).as_posix() for _, png in figures]}
    atomic_write_json(out_dir / "report.json", summary)
    return summary
