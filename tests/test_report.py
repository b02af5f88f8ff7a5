"""The evidence checklist's rules, the table renderers and `esa report`'s handling of bad input."""

import json
import math

from typer.testing import CliRunner

from esa.cli.main import app
from esa.reporting import checklist as cl
from esa.reporting.tables import Table, fmt, latex_escape, to_latex, to_markdown

runner = CliRunner()


def perturb_results(lower_bound=10.0, p_super=0.025, p_order=0.025, collapsed=0, bottom_unchanged=False,
                    n_sets=39):
    """results.json of a perturb run as esa.stats writes it (only the fields the checklist reads)."""
    cond = lambda d: {"delta_ppl": d, "n_collapsed": 0, "n_trials": 3}  # noqa: E731
    conds = {"super": cond(5.0), "random_k": cond(0.5), "bottom_k": cond(0.1)}
    conds["super"]["n_collapsed"] = collapsed
    rank = lambda p: {"unit": "weight set", "test": "monte_carlo_rank", "p_value": p,  # noqa: E731
                      "n_control_sets": n_sets, "parametric": {"p_value": p / 2},
                      "per_window": {"p_paired_t": 1e-9, "p_wilcoxon": 1e-8}}
    tests = {"super_vs_random_k": rank(p_super), "random_k_vs_bottom_k": rank(p_order)}
    if bottom_unchanged:
        tests["random_k_vs_bottom_k"]["not_informative"] = "bottom_k left every window's loss exactly unchanged"
    return {"perturbation": {"kind": "zero"}, "conditions": conds,
            "effect_ratio": {"value": 12.0, "lower_bound_95": lower_bound, "ci95": [5.0, 20.0], "unit": "weight set"},
            "tests": tests, "restore_verified": True, "source": "selection"}


def status(criteria, prefix):
    return next(c.status for c in criteria if c.name.startswith(prefix))


def checked(*results):
    """The rows of several perturb runs in one report, Holm-corrected together."""
    rows = []
    for i, r in enumerate(results):
        rows += cl.perturb_criteria(f"r{i}", r)
    return cl.apply_holm(rows)


def test_perturb_criteria_thresholds():
    good = checked(perturb_results())
    assert status(good, "effect ratio") == cl.MET
    assert status(good, cl.ORDER) == cl.MET  # Holm: 0.025·2 = 0.05 ≤ 0.05
    assert status(good, cl.RANK) == cl.MET
    assert status(good, "no collapsed trial") == cl.MET
    assert all(c.unit == "weight set" for c in good if c.group == "evidence")
    bad = checked(perturb_results(lower_bound=1.9, p_super=0.2, p_order=0.6, collapsed=1))
    assert status(bad, "effect ratio") == cl.NOT_MET
    assert status(bad, cl.ORDER) == cl.NOT_MET
    assert status(bad, cl.RANK) == cl.NOT_MET
    assert status(bad, "no collapsed trial") == cl.NOT_MET
    # Exactly at the threshold is not "> 2"; an undefined bound is not evidence.
    assert status(checked(perturb_results(lower_bound=2.0)), "effect ratio") == cl.NOT_MET
    assert status(checked(perturb_results(lower_bound=math.nan)), "effect ratio") == cl.NOT_MET
    assert status(checked(perturb_results(lower_bound=math.inf)), "effect ratio") == cl.MET
    # Per-window paired tests are descriptions: a tiny paired p does not make a row met.
    assert status(checked(perturb_results(p_super=0.3)), cl.RANK) == cl.NOT_MET


def test_holm_correction_across_the_report():
    # In a family of two rows p = 0.02 is met (2 · 0.02 ≤ 0.05), p = 0.04 is not; with four rows 0.025 is not.
    assert status(checked(perturb_results(p_super=0.02, p_order=0.9)), cl.RANK) == cl.MET
    assert status(checked(perturb_results(p_super=0.04, p_order=0.9)), cl.RANK) == cl.NOT_MET
    rows = checked(perturb_results(p_super=0.025, p_order=0.025), perturb_results(p_super=0.025, p_order=0.025))
    ranks = [c for c in rows if c.name == cl.RANK]
    assert [c.status for c in ranks] == [cl.NOT_MET, cl.NOT_MET]
    assert ranks[0].p_holm == 0.1 and "Holm family: 4 p-value rows" in ranks[0].detail


def test_old_runs_and_missing_controls_are_not_measured():
    old = {"conditions": {"super": {}, "random_k": {}, "bottom_k": {}}, "effect_ratio": {"value": 9.0},
           "tests": {"super_vs_random_k": {"p_paired_t": 1e-6}}, "restore_verified": True}
    rows = checked(old)
    assert status(rows, "effect ratio") == cl.NOT_MEASURED and status(rows, cl.RANK) == cl.NOT_MEASURED
    assert "predates" in next(c.detail for c in rows if c.name == cl.RANK)


def test_bottom_k_that_changes_nothing_is_not_informative():
    rows = checked(perturb_results(bottom_unchanged=True))
    order = next(c for c in rows if c.name == cl.ORDER)
    assert order.status == cl.NOT_INFORMATIVE and order.p_holm is None
    assert status(rows, cl.RANK) == cl.MET  # and it leaves the Holm family
    # A run written before the flag existed: ΔPPL exactly 0 in every seed is read the same way.
    old = perturb_results()
    del old["tests"]["random_k_vs_bottom_k"]
    old["conditions"]["bottom_k"]["per_seed"] = [{"delta_ppl": 0.0}] * 3
    assert status(checked(old), cl.ORDER) == cl.NOT_INFORMATIVE


def test_profile_and_baseline_criteria():
    metrics = {"metric": "grad_x_weight", "heavier_than_exponential": True, "hill_alpha": 1.8, "best_tail_fit": "power_law",
               "excess_kurtosis": 40.0, "topk_share_embed": 0.1, "topk_share_lm_head": 0.2, "tensors_with_topk": 7,
               "largest_single_tensor_share": 0.3, "max_over_mean": 500.0}
    crit = cl.profile_criteria("p", metrics, {"mean_jaccard": 0.45, "fraction": 0.5})
    assert [c.status for c in crit] == [cl.MET] * 4
    confined = dict(metrics, topk_share_embed=0.4, topk_share_lm_head=0.2, heavier_than_exponential=False)
    crit = cl.profile_criteria("p", confined, {"mean_jaccard": 0.2})
    assert status(crit, "heavy-tailed") == cl.NOT_MET and status(crit, "top-k not confined") == cl.NOT_MET
    assert status(crit, "top-k Jaccard") == cl.NOT_MET
    one_tensor = cl.profile_criteria("p", dict(metrics, tensors_with_topk=1), None)
    assert status(one_tensor, "top-k not confined") == cl.NOT_MET

    ok = cl.baseline_criteria("b", {"ppl": 6.2, "mean_nll": 1.82, "accuracy": 0.5, "uniform_guess_ppl": 128256,
                                    "leak_warnings": []})
    assert [c.status for c in ok] == [cl.MET] * 3
    leaky = cl.baseline_criteria("b", {"ppl": 1.03, "mean_nll": 0.03, "accuracy": 0.994, "uniform_guess_ppl": 128256,
                                       "leak_warnings": ["PPL 1.03 < 1.5"]})
    assert status(leaky, "baseline not leaky") == cl.NOT_MET
    collapsed = cl.baseline_criteria("b", {"ppl": 300000.0, "mean_nll": 12.6, "accuracy": 0.0,
                                           "uniform_guess_ppl": 128256, "leak_warnings": []})
    assert status(collapsed, "baseline not collapsed") == cl.NOT_MET


def test_overlap_criterion_uses_gradient_metric_pairs_and_names_shared_factors():
    pair = lambda a, b, o: {"a": a, "b": b, "a_metric": a, "b_metric": b, "overlap_at_k": o}  # noqa: E731
    cmp = {"pairs": [pair("grad_x_weight", "grad_squared", 0.62), pair("magnitude", "act_mag", 0.95),
                     pair("grad_squared", "magnitude", 0.05)]}
    row = cl.overlap_criterion(cmp)
    assert row.value == 0.62 and row.status == cl.MET  # the |w|-sharing pair does not carry the row
    assert "magnitude~act_mag: 0.95 (share |w| by construction)" in row.detail
    cmp["pairs"][0]["overlap_at_k"] = 0.5
    assert cl.overlap_criterion(cmp).status == cl.NOT_MET
    only_w = cl.overlap_criterion({"pairs": [pair("magnitude", "act_mag", 0.95)]})
    assert only_w.status == cl.NOT_MEASURED and only_w.value is None


def test_table_rendering_escapes():
    t = Table("t_1", "ΔPPL & co", ["name_x", "p"], [["a|b", fmt(0.00012)], ["50%", fmt(math.inf)]], note="α_1")
    md = to_markdown(t)
    assert "a\\|b" in md and "1.200e-04" in md and "∞" in md
    tex = to_latex(t)
    assert r"$\Delta$PPL \& co" in tex and r"name\_x" in tex and r"50\%" in tex and r"$\infty$" in tex
    assert latex_escape("p < 0.05, ratio > 2") == r"p $<$ 0.05, ratio $>$ 2"
    assert r"\label{tab:t_1}" in tex and r"\toprule" in tex
    assert latex_escape("{x}~^\\") == r"\{x\}\textasciitilde{}\textasciicircum{}\textbackslash{}"
    assert fmt(None) == "—" and fmt(float("nan")) == "n/a" and fmt(True) == "yes" and fmt(12345) == "12,345"


def test_report_bad_input_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, match in [([str(tmp_path / "missing")], "is not a directory"),
                        ([str(empty)], "holds no run")]:
        result = runner.invoke(app, ["report", *args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and match in result.output and "Traceback" not in result.output
    # An unfinished run (no manifest) is left out and said so; with nothing else, it is an error.
    run = tmp_path / "runs" / "half"
    run.mkdir(parents=True)
    (run / "window_nll.csv").write_text("window,nll\n0,1.0\n")
    (run / "config.json").write_text(json.dumps({}))
    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no finished run" in result.output and "unfinished" in result.output
    assert not (tmp_path / "out").exists()


def test_trivial_jaccard_and_missing_criteria_are_not_measured():
    trivial = cl.jaccard_criterion("p", {"mean_jaccard": 1.0, "warning": "every seed used all windows"}, "s")
    assert trivial.status == cl.NOT_MEASURED and "every seed" in trivial.detail
    present = cl.perturb_criteria("r", perturb_results())
    missing = {c.name: c for c in cl.not_measured(present)}
    assert set(missing) == {cl.JACCARD, cl.OVERLAP, cl.HEAVY, cl.SPREAD}
    assert all(c.status == cl.NOT_MEASURED and c.detail.startswith("needs") for c in missing.values())


def test_jaccard_against_its_chance_level_and_not_applicable_for_magnitude():
    assert cl.jaccard_chance(0.5) == 1 / 3
    row = lambda j, f, m="grad_x_weight": cl.jaccard_criterion("p", {"mean_jaccard": j, "fraction": f}, "s",  # noqa
                                                                  metric=m)
    assert row(0.32, 0.5).status == cl.NOT_MET  # above 0.3 but below chance (1/3) at half the windows
    assert row(0.40, 0.5).status == cl.MET
    assert row(0.40, 0.8).status == cl.NOT_MET  # chance 0.667 at 80% of the windows
    assert row(0.32, 0.2).status == cl.MET  # chance 0.111: the runbook's 0.3 is the bar
    assert row(1.0, 0.5, "magnitude").status == cl.NOT_APPLICABLE


def fake_baseline_run(run_dir, ppl=10.0):
    run_dir.mkdir(parents=True)
    (run_dir / "window_nll.csv").write_text("window,nll\n0,1.0\n")
    (run_dir / "config.json").write_text("{}")
    (run_dir / "metrics.json").write_text(json.dumps({"ppl": ppl, "mean_nll": math.log(ppl), "accuracy": 0.3,
                                                      "uniform_guess_ppl": 256, "leak_warnings": []}))
    (run_dir / "experiment_manifest.json").write_text(json.dumps({"status": "complete", "model": {"model_id": "m"}}))


def test_collect_labels_and_keys_are_unique(tmp_path, monkeypatch):
    from esa.reporting.collect import collect

    for name in ("x-y", "x_y"):
        fake_baseline_run(tmp_path / "runs" / name)
    col = collect([tmp_path / "runs"])
    assert [r.label for r in col.runs] == ["runs/x-y", "runs/x_y"]
    assert len({r.key for r in col.runs}) == 2
    monkeypatch.chdir(tmp_path / "runs" / "x-y")
    assert collect(["."]).runs[0].label == "x-y"
    # The same directory twice is read once; two directories of one name keep distinct labels.
    fake_baseline_run(tmp_path / "a" / "base")
    fake_baseline_run(tmp_path / "b" / "base")
    labels = [r.label for r in collect([tmp_path / "a" / "base", tmp_path / "b" / "base", tmp_path / "a" / "base"]).runs]
    assert labels == ["base", "base (2)"]


def test_report_of_baselines_only_marks_every_evidence_row_not_measured(tmp_path):
    fake_baseline_run(tmp_path / "b")
    result = runner.invoke(app, ["report", str(tmp_path / "b"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out" / "checklist.json").read_text())["criteria"]
    evidence = [r for r in rows if r["group"] == "evidence"]
    assert {r["name"] for r in evidence} == set(cl.NEEDS) and all(r["status"] == cl.NOT_MEASURED for r in evidence)
    assert [r["status"] for r in rows if r["group"] == "technical"] == [cl.MET] * 3
