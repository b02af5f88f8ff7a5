"""The evidence checklist's rules, the table renderers and `esa report`'s handling of bad input."""

import json
import math

from typer.testing import CliRunner

from esa.cli.main import app
from esa.report import checklist as cl
from esa.report.tables import Table, fmt, latex_escape, to_latex, to_markdown

runner = CliRunner()


def perturb_results(ratio, d_random=0.5, d_bottom=0.1, p_paired=0.01, p_seeds=0.02, collapsed=0):
    cond = lambda d: {"delta_ppl": d, "n_collapsed": 0, "n_trials": 3}  # noqa: E731
    conds = {"super": cond(5.0), "random_k": cond(d_random), "bottom_k": cond(d_bottom)}
    conds["super"]["n_collapsed"] = collapsed
    return {"perturbation": {"kind": "zero"}, "conditions": conds, "effect_ratio": {"value": ratio},
            "tests": {"super_vs_random_k": {"p_paired_t": p_paired, "across_seeds": {"test": "welch", "p_value": p_seeds}},
                      "random_k_vs_bottom_k": {"p_paired_t": 0.2}},
            "restore_verified": True, "source": "selection"}


def status(criteria, prefix):
    return next(c.status for c in criteria if c.name.startswith(prefix))


def test_perturb_criteria_thresholds():
    good = cl.perturb_criteria("r", perturb_results(10.0))
    assert status(good, "effect ratio") == cl.MET
    assert status(good, "ΔPPL(random_k) ≥ ΔPPL(bottom_k)") == cl.MET
    assert status(good, "super vs random_k across seeds") == cl.MET
    assert status(good, "super vs random_k per window") == cl.MET
    assert status(good, "no collapsed trial") == cl.MET
    bad = cl.perturb_criteria("r", perturb_results(1.5, d_random=0.1, d_bottom=0.4, p_paired=0.2, p_seeds=0.3,
                                                   collapsed=1))
    assert status(bad, "effect ratio") == cl.NOT_MET
    assert status(bad, "ΔPPL(random_k) ≥ ΔPPL(bottom_k)") == cl.NOT_MET
    assert status(bad, "super vs random_k across seeds") == cl.NOT_MET
    assert status(bad, "super vs random_k per window") == cl.NOT_MET
    assert status(bad, "no collapsed trial") == cl.NOT_MET
    # Exactly at the threshold is not "> 2"; a ratio that cannot be computed cannot be judged (an infinite one:
    # see test_effect_ratio_when_random_k_does_not_raise_ppl).
    assert status(cl.perturb_criteria("r", perturb_results(2.0)), "effect ratio") == cl.NOT_MET
    assert status(cl.perturb_criteria("r", perturb_results(math.nan, p_seeds=math.nan)),
                  "effect ratio") == cl.NOT_MEASURED
    assert status(cl.perturb_criteria("r", perturb_results(3.0, p_seeds=math.nan)),
                  "super vs random_k across seeds") == cl.NOT_MEASURED


def test_profile_and_baseline_criteria():
    metrics = {"metric": "grad_x_weight", "heavier_than_exponential": True, "hill_alpha": 1.8, "best_tail_fit": "power_law",
               "excess_kurtosis": 40.0, "topk_share_embed": 0.1, "topk_share_lm_head": 0.2, "tensors_with_topk": 7,
               "largest_single_tensor_share": 0.3, "max_over_mean": 500.0}
    crit = cl.profile_criteria("p", metrics, {"mean_jaccard": 0.45})
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


def test_overlap_criterion():
    cmp = {"mean_overlap_at_k": 0.62, "pairs": [{"a": "x", "b": "y", "overlap_at_k": 0.62}]}
    assert cl.overlap_criterion(cmp).status == cl.MET
    assert cl.overlap_criterion(dict(cmp, mean_overlap_at_k=0.5)).status == cl.NOT_MET


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


def test_effect_ratio_when_random_k_does_not_raise_ppl():
    def results(d_super, ci_super, d_random, ratio):
        r = perturb_results(ratio, d_random=d_random)
        r["conditions"]["super"].update(delta_ppl=d_super, ci95_delta_ppl=ci_super)
        return r

    # random_k harmless: the ratio is infinite; it counts only if super's own CI excludes zero.
    assert status(cl.perturb_criteria("r", results(3.4, [0.5, 6.0], -0.1, math.inf)), "effect ratio") == cl.MET
    assert status(cl.perturb_criteria("r", results(3.4, [-0.3, 5.7], -0.1, math.inf)), "effect ratio") == cl.NOT_MET
    # Neither raised PPL: the ratio is undefined, and the criterion is plainly not met.
    assert status(cl.perturb_criteria("r", results(-0.2, [-0.4, 0.0], -0.1, math.nan)), "effect ratio") == cl.NOT_MET
    # super collapsed (infinite ΔPPL) while random_k stayed finite.
    assert status(cl.perturb_criteria("r", results(math.inf, None, 0.3, math.inf)), "effect ratio") == cl.MET


def test_control_ordering_with_a_collapsed_control():
    collapsed_bottom = perturb_results(10.0, d_random=0.5, d_bottom=math.inf)
    assert status(cl.perturb_criteria("r", collapsed_bottom), "ΔPPL(random_k)") == cl.NOT_MET
    collapsed_random = perturb_results(10.0, d_random=math.inf, d_bottom=0.1)
    assert status(cl.perturb_criteria("r", collapsed_random), "ΔPPL(random_k)") == cl.MET
    no_bottom = perturb_results(10.0)
    del no_bottom["conditions"]["bottom_k"]
    assert status(cl.perturb_criteria("r", no_bottom), "ΔPPL(random_k)") == cl.NOT_MEASURED


def test_trivial_jaccard_and_missing_criteria_are_not_measured():
    trivial = cl.jaccard_criterion("p", {"mean_jaccard": 1.0, "warning": "every seed used all windows"}, "s")
    assert trivial.status == cl.NOT_MEASURED and "every seed" in trivial.detail
    present = cl.perturb_criteria("r", perturb_results(10.0))
    missing = {c.name: c for c in cl.not_measured(present)}
    assert set(missing) == {cl.JACCARD, cl.OVERLAP, cl.HEAVY, cl.SPREAD}
    assert all(c.status == cl.NOT_MEASURED and c.detail.startswith("needs") for c in missing.values())


def fake_baseline_run(run_dir, ppl=10.0):
    run_dir.mkdir(parents=True)
    (run_dir / "window_nll.csv").write_text("window,nll\n0,1.0\n")
    (run_dir / "config.json").write_text("{}")
    (run_dir / "metrics.json").write_text(json.dumps({"ppl": ppl, "mean_nll": math.log(ppl), "accuracy": 0.3,
                                                      "uniform_guess_ppl": 256, "leak_warnings": []}))
    (run_dir / "experiment_manifest.json").write_text(json.dumps({"status": "complete", "model": {"model_id": "m"}}))


def test_collect_labels_and_keys_are_unique(tmp_path, monkeypatch):
    from esa.report.collect import collect

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
