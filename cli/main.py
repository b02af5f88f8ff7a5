"""The ``esa`` command line: a thin layer over the library; each command writes one run directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from esa.cli import helpformat
from esa.cli import options as o
from esa.cli.errors import user_errors
from esa.config import (BaselineConfig, PerturbConfig, ProfileConfig, ReportConfig, RunbookConfig, SuperweightsConfig,
                        TensorsConfig, ValidateConfig)

helpformat.install()
app = typer.Typer(
    name="esa",
    help="Extreme Sensitivity Analysis: find the weights of a causal LM that matter most, and test them causally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
tiny_app = typer.Typer(help="The embedded tiny model.", no_args_is_help=True)
app.add_typer(tiny_app, name="tiny")
console = Console(highlight=False, soft_wrap=True)  # long lines stay whole in logs; tables: see show()


@app.callback()
def _main(version: o.Version = False) -> None:
    """Extreme Sensitivity Analysis: find the weights of a causal LM that matter most, and test them causally."""


def show(table: Table) -> None:
    """Print ``table`` as a grid when it fits the console unwrapped; otherwise stacked, one block per row of
    ``column: value`` lines, so that no value is ever wrapped or cut (80 columns, a log file)."""
    needed = console.measure(table, options=console.options.update_width(1 << 16)).maximum
    if needed <= console.width:
        console.print(table)
        return
    if table.title:
        console.print(f"[bold]{table.title}[/]", soft_wrap=True)
    headers = [str(c.header) for c in table.columns]
    columns = [list(c.cells) for c in table.columns]
    for r in range(table.row_count):
        cells = [str(col[r]) for col in columns]
        if not table.show_header:  # a two-column label / value table
            console.print(f"  {cells[0]}: " + "  ".join(cells[1:]), soft_wrap=True)
            continue
        console.print(f"  {headers[0]}: {cells[0]}", soft_wrap=True)
        for header, cell in zip(headers[1:], cells[1:]):
            console.print(f"      {header}: {cell}", soft_wrap=True)


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


@app.command()
@user_errors
@o.takes("baseline")
def baseline(config: BaselineConfig) -> None:
    """Perplexity, loss and next-token accuracy on the evaluation windows (per-window NLL kept)."""
    from esa.commands.baseline import run_baseline

    run = run_baseline(config)
    print_baseline(run.metrics, run.session.describe(), run.out_dir)


def print_baseline(metrics: dict, described: dict, out_dir: Path) -> None:
    m, w = described["model"], described["windows"]
    table = Table(title=f"baseline — {m['model_id']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("perplexity", _fmt(metrics["ppl"]))
    table.add_row("mean NLL (nats/token)", _fmt(metrics["mean_nll"]))
    table.add_row("next-token accuracy", _fmt(metrics["accuracy"]))
    table.add_row("tokens evaluated", f"{metrics['tokens']:,}")
    table.add_row("windows × seq_len", f"{w['n_windows']} × {w['seq_len']} (of {w['n_available']} available)")
    table.add_row("uniform-guess PPL", str(metrics.get("uniform_guess_ppl")))
    table.add_row("model", f"{m['architecture']}, {m['n_parameters']:,} params, {m['dtype']} on {m['device']}")
    table.add_row("dataset", str(described["dataset"].get("dataset")))
    show(table)
    for warning in metrics.get("leak_warnings", []):
        console.print(f"[bold red]LEAK SUSPECTED:[/] {warning}")
    console.print(f"results in {out_dir}")


@app.command()
@user_errors
@o.takes("profile")
def profile(config: ProfileConfig) -> None:
    """Sensitivity scores of every weight, top-k / bottom-k selection, heavy-tail statistics and locations."""
    from esa.commands.profile import run_profile

    run = run_profile(config)
    print_profile(run["metrics"], run["stability"], run["out_dir"])


def print_profile(metrics: dict, stability: dict | None, out_dir: Path) -> None:
    table = Table(title=f"profile — {metrics['metric']}, {metrics['mode']}, k={metrics['topk']}", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("scored weights", f"{metrics['scored_weights']:,} in {metrics['scored_tensors']} tensors")
    table.add_row("selected", f"{metrics['selected']:,} (in {metrics['tensors_with_topk']} tensors)")
    top1 = metrics.get("top1")
    if top1:
        lead = "" if top1.get("expert") is None else f"expert {top1['expert']}, "  # a fused expert stack
        where = f"{top1['tensor']} [{lead}{top1['row']}" + ("" if top1["col"] is None else f", {top1['col']}") + "]"
        table.add_row("top-1 weight", f"{where}  score {top1['score']:.4g}")
    table.add_row("share of score mass in top-k", _fmt(metrics["topk_mass_share"]))
    table.add_row("max / mean score", f"{metrics['max_over_mean']:.4g}")
    table.add_row("excess kurtosis · Gini", f"{metrics['excess_kurtosis']:.4g} · {metrics['gini']:.3f}")
    alpha = metrics.get("hill_alpha")
    table.add_row("tail index (Hill α) · best fit",
                  f"{'n/a' if alpha is None else f'{alpha:.3g}'} · {metrics.get('best_tail_fit') or 'n/a'}")
    table.add_row("top-k in embeddings · lm_head",
                  f"{metrics['topk_share_embed']:.1%} · {metrics['topk_share_lm_head']:.1%}")
    if stability:
        pairs = ", ".join(f"{k}: {v:.3f}" for k, v in stability["pairwise_jaccard"].items())
        table.add_row("top-k Jaccard across seeds", f"mean {stability['mean_jaccard']:.3f} ({pairs})")
    show(table)
    if stability and stability.get("warning"):
        console.print(f"[yellow]warning:[/] {stability['warning']}")
    console.print(f"results in {out_dir}")


@app.command()
@user_errors
def compare(run_dirs: o.RunDirs, out: o.CompareOut = None) -> None:
    """Overlap@k, Jaccard and rank correlation between the top-k sets of profile runs (e.g. different metrics)."""
    from esa.commands.compare import run_compare

    result = run_compare(run_dirs, out)
    table = Table(title="top-k agreement between runs", title_justify="left")
    for col in ("run A", "run B", "overlap@k", "Jaccard", "Spearman ρ", "ρ basis"):
        table.add_column(col, justify="right" if col[0] in "oJS" else "left")
    for p in result["pairs"]:
        table.add_row(p["a"], p["b"], _fmt(p["overlap_at_k"], 3), _fmt(p["jaccard"], 3), _fmt(p["spearman"], 3),
                      p["basis"])
    show(table)
    if out is not None:
        console.print(f"results in {out}")


@app.command()
@user_errors
@o.takes("tensors")
def tensors(config: TensorsConfig) -> None:
    """List the tensors profile would score, with their layer and component names (for --include/--exclude)."""
    from esa.modeling import load_model
    from esa.tensors import select_tensors

    m, sel = config.model, config.selection
    loaded = load_model(m.model, dtype=m.dtype, device=m.device, revision=m.revision,
                        trust_remote_code=m.trust_remote_code)
    chosen = select_tensors(loaded.model, sel.include, sel.exclude, biases=sel.include_biases, norms=sel.include_norms)
    table = Table(title=f"tensors of {loaded.model_id}", title_justify="left")
    for col in ("tensor", "shape", "layer", "component", "weights"):
        table.add_column(col, justify="right" if col == "weights" else "left")
    for info, _ in chosen:
        table.add_row(info.name + ("" if not info.aliases else f" (= {', '.join(info.aliases)})"),
                      "×".join(map(str, info.shape)), "" if info.layer is None else str(info.layer), info.component,
                      f"{info.numel:,}")
    show(table)
    console.print(f"{len(chosen)} tensors, {sum(i.numel for i, _ in chosen):,} weights")


@app.command()
@user_errors
@o.takes("perturb")
def perturb(config: PerturbConfig) -> None:
    """Causal test: perturb the top-k weights and random_k / bottom_k controls over seeds, restoring bit-exactly.

    Rerunning the same command resumes an interrupted run.
    """
    from esa.commands.perturb import run_perturb

    run = run_perturb(config)
    print_perturb(run["results"], run["out_dir"])


def _p(x: float | None) -> str:
    return "n/a" if x is None or x != x else (f"{x:.2e}" if x < 1e-3 else f"{x:.4f}")


def print_perturb(results: dict, out_dir: Path) -> None:
    spec = results["perturbation"]
    base = results["baseline"]
    table = Table(title=f"perturb — {spec['kind']} (baseline PPL {base['ppl']:.4f}, {base['n_windows']} windows)",
                  title_justify="left")
    for col in ("condition", "weights", "PPL", "ΔPPL", "95% CI", "ΔPPL over seeds", "collapsed"):
        table.add_column(col, justify="left" if col == "condition" else "right")
    for cond, c in results["conditions"].items():
        ci = c.get("ci95_delta_ppl")
        spread = (f"{c['delta_ppl_mean_over_seeds']:.4g} ± {c['delta_ppl_std_over_seeds']:.2g}"
                  if "delta_ppl_mean_over_seeds" in c else "n/a")
        table.add_row(cond, f"{c['n_weights']:,}", f"{c['ppl']:.4f}", f"{c['delta_ppl']:+.4g}",
                      f"[{ci[0]:+.3g}, {ci[1]:+.3g}]" if ci else "n/a", spread,
                      f"{c['n_collapsed']}/{c['n_trials']}")
    show(table)
    for key, t in results["tests"].items():
        window = t.get("per_window", {})
        console.print(f"{key.replace('_vs_', ' vs ')}: rank p={_p(t.get('p_value'))} over "
                      f"{t.get('n_control_sets', 'n/a')} control sets (unit: weight set), parametric "
                      f"p={_p(t.get('parametric', {}).get('p_value'))}; per window given these sets: paired t "
                      f"p={_p(window.get('p_paired_t'))}" + (f" — not informative: {t['not_informative']}"
                                                            if t.get("not_informative") else ""))
    ratio = results["effect_ratio"]
    console.print(f"effect ratio ΔNLL(super)/ΔNLL(random_k): {_fmt(ratio.get('value', float('nan')), 3)}, set-level "
                  f"95% lower bound {_fmt(ratio.get('lower_bound_95', float('nan')), 3)}"
                  + (f" (95% CI sets→windows {ratio['ci95'][0]:.3g}–{ratio['ci95'][1]:.3g})" if ratio.get("ci95")
                     else "") + (f" — {ratio['note']}" if ratio.get("note") else ""))
    if "stability" in results:
        console.print(f"top-k Jaccard across seeds: mean {results['stability']['mean_jaccard']:.3f}")
    console.print(f"results in {out_dir}")


@app.command()
@user_errors
@o.takes("superweights")
def superweights(config: SuperweightsConfig) -> None:
    """Super weights from activation spikes of the MLP down projections (Yu et al. 2024), no gradient needed."""
    from esa.commands.superweights import run_superweights

    run = run_superweights(config)
    m = run["metrics"]
    table = Table(title=f"super weights — {m['input']}, spike > {m['threshold']:g} and > "
                        f"{m['relative_threshold']:g}× layer median", title_justify="left")
    for col in ("rank", "tensor", "expert", "row", "col", "input spike", "output spike", "weight", "pass", "known"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    for i, c in enumerate(run["found"], start=1):
        table.add_row(str(i), c.tensor, "" if c.expert is None else str(c.expert), str(c.row), str(c.col),
                      f"{c.input_spike:.4g}", f"{c.output_spike:.4g}", f"{c.weight:.4g}", str(c.iteration), c.known)
    console.print(table)
    if m["note"]:
        console.print(m["note"])
    if m["registry"]:
        r = m["registry"]
        console.print(f"published ({r['model']}): {r['found_published']} of {r['published']} found")
    if m["profile_ranks"]:
        p = m["profile_ranks"]
        console.print(f"ranks under {p['metric']} ({p['basis']}): "
                      + ", ".join(f"{k} → {v if v is not None else 'not in top-k'}" for k, v in p["ranks"].items()))
    med = m.get("mediation")
    if med and "ppl_intact" in med:
        console.print(f"mediation: PPL {med['ppl_intact']:.4g} intact, {med['ppl_zeroed']:.4g} zeroed, "
                      f"{med['ppl_zeroed_activation_restored']:.4g} zeroed with the super activation restored "
                      f"(recovered {_fmt(med['recovered'], 3)} of the NLL damage)")
    console.print(f"results in {run['out_dir']}")


@app.command()
@user_errors
@o.takes("validate")
def validate(config: ValidateConfig) -> None:
    """Exact single-weight ablations against every metric: which metric predicts the true loss change?

    Rerunning the same command resumes an interrupted run.
    """
    from esa.commands.validate import run_validate

    run = run_validate(config)  # its selection: esa.options.COMMANDS["validate"].finish
    s = run["summary"]
    table = Table(title=f"which metric predicts the true effect? {s['perturb']} ablation of {s['n_sample']:,} sampled "
                        f"weights ({s['n_ablations']:,} with the top-k)", title_justify="left")
    for col in ("metric", "Spearman |Δ|", "95% CI", "Kendall |Δ|", "Spearman signed", f"precision@{s['precision_k']}",
                "own top-k mean |ΔNLL|"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for m, f in s["metrics"].items():
        ci = f["spearman_abs_ci95"]
        table.add_row(m, _fmt(f["spearman_abs"], 3), f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a",
                      _fmt(f["kendall_abs"], 3), _fmt(f["spearman_signed"], 3), _fmt(f["precision_at_k"], 3),
                      f"{f['own_topk_mean_abs_delta_nll']:.3g}" if f["own_topk_mean_abs_delta_nll"] is not None else "n/a")
    console.print(table)
    console.print(f"results in {run['out_dir']}")


@app.command()
@user_errors
@o.takes("report")
def report(run_dirs: o.ReportRunDirs, config: ReportConfig) -> None:
    """Figures, tables (Markdown, HTML, LaTeX) and the evidence checklist from finished runs; loads no model."""
    from esa.commands.report import run_report

    out = Path(config.out)
    summary = run_report(run_dirs, config)
    print_checklist(out / "checklist.json")
    if summary["skipped"]:
        console.print("[yellow]left out:[/] " + "; ".join(summary["skipped"]))
    console.print(f"report in {out / 'report.html'} (and report.md, tables.tex, figures/)")


def print_checklist(path: Path) -> None:
    from esa.reporting.tables import fmt
    from esa.runio import read_json

    colour = {"met": "green", "not met": "red", "not measured": "dim", "not applicable": "dim",
              "not informative": "yellow"}
    table = Table(title="evidence checklist", title_justify="left")
    for col in ("criterion", "run", "measured", "threshold", "status"):
        table.add_column(col, justify="right" if col == "measured" else "left")
    for c in read_json(path)["criteria"]:
        value = c["value"] if isinstance(c["value"], str) else fmt(c["value"])
        table.add_row(c["name"], c["run"] or "all", value, c["threshold"],
                      f"[{colour[c['status']]}]{c['status']}[/]")
    show(table)


@user_errors
@o.takes("run")
def run(config: RunbookConfig) -> None:
    """The runbook: baseline → profile → perturb (with --perturb) → report, into sub-directories of --out-dir.

    Every option of esa baseline, profile, perturb and report is accepted (but --from-profile, --weights and
    --out: the runbook chains its phases itself). Rerunning the same command reuses finished phases and resumes
    interrupted trials.
    """
    from esa.commands.run import run_runbook

    out_dir = Path(config.out_dir)

    def finished(phase: str, result) -> None:  # each phase's table right after its ▶ line
        if phase == "baseline":
            print_baseline(result.metrics, result.session.describe(), out_dir / "baseline")
        elif phase == "profile":
            print_profile(result["metrics"], result["stability"], out_dir / "profile")
        elif phase == "perturb":
            print_perturb(result["results"], out_dir / "perturb")

    run_runbook(config, announce=lambda line: console.print(f"[bold]▶[/] {line}"), finished=finished)
    print_checklist(out_dir / "report" / "checklist.json")
    console.print(f"report in {out_dir / 'report' / 'report.html'}")


app.command(name="run")(run)
# The runbook's own entry point (phase1_runner_enhanced.py): the same command, as a program of its own.
runbook_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
runbook_app.command()(run)


@app.command()
@user_errors
@o.takes("plan")
def plan(command: o.PlanCommand = o.COMMANDS["plan"].opt("command").default, device_memory: o.DeviceMemory = None,
         json_output: o.Json = False, *,
         config: RunbookConfig) -> None:
    """Predicted peak device memory per phase, score groups, batch size and wall time; exit 1 if it cannot fit.

    Takes every option of esa run (those that do not change the cost are accepted and ignored), so that a
    command line can be planned as it is.
    """
    import json

    from esa.commands.plan import run_plan

    planned = run_plan(config, command=command, device_memory=device_memory)
    if json_output:
        print(json.dumps(planned.plan, indent=1))
    else:
        for line in planned.lines:
            console.print(line, markup=False)
    if not planned.fits:
        raise typer.Exit(1)


@tiny_app.command("train")
@user_errors
def tiny_train(
    out_dir: o.TinyOutDir = Path("esa-tiny"),
    steps: o.TinySteps = 1200,
    seed: o.TinySeed = 0,
    overwrite: o.TinyOverwrite = False,
) -> None:
    """Rebuild the embedded tiny model from Python's own documentation (about 5 minutes on 2 idle CPU cores)."""
    from esa.tiny.train import TinyRecipe, train

    summary = train(out_dir, TinyRecipe(steps=steps, seed=seed), overwrite=overwrite)
    console.print(f"held-out PPL {summary['held_out_ppl']:.2f} (uniform guess {summary['uniform_guess_ppl']}); "
                  f"written to {out_dir}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
