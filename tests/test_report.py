"""The evidence checklist's rules, the table renderers and `esa report`'s handling of bad input."""

import json
import math

from typer.testing import CliRunner

from esa.cli.main import app
from esa.report import checklist as cl
from esa.report.tables import Table, fmt, latex_escape, to_latex, to_markdown

runner = CliRunner()


def perturb_results(ratio, d_random=0.5, d_bottom=0.1, p_paired=0.01, p_welch=0.02, collapsed=0):
    cond = lambda d: {"delta_ppl": d, "n_collapsed": 0, "n_trials": 3}  # noqa: E731
    conds = {"super": cond(5.0), "random_k": cond(d_random), "bottom_k": cond(d_bottom)}
    conds["super"]["n_collapsed"] = collapsed
    return {"perturbation": {"kind": "zero"}, "conditions": conds, "effect_ratio": {"value": ratio},
            "tests": {"super_vs_random_k": {"p_paired_t": p_paired, "across_seeds": {"p_welch": p_welch}},
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
    bad = cl.perturb_criteria("r", perturb_results(1.5, d_random=0.1, d_bottom=0.4, p_paired=0.2, p_welch=0.3,
                                                   collapsed=1))
    assert status(bad, "effect ratio") == cl.NOT_MET
    assert status(bad, "ΔPPL(random_k) ≥ ΔPPL(bottom_k)") == cl.NOT_MET
    assert status(bad, "super vs random_k across seeds") == cl.NOT_MET
    assert status(bad, "super vs random_k per window") == cl.NOT_MET
    assert status(bad, "no collapsed trial") == cl.NOT_MET
    # Exactly at the threshold is not "> 2"; infinite (random_k harmless) is; NaN cannot be judged.
    assert status(cl.perturb_criteria("r", perturb_results(2.0)), "effect ratio") == cl.NOT_MET
    assert status(cl.perturb_criteria("r", perturb_results(math.inf)), "effect ratio") == cl.MET
    assert status(cl.perturb_criteria("r", perturb_results(math.nan, p_welch=math.nan)),
                  "effect ratio") == cl.NOT_MEASURED
    assert status(cl.perturb_criteria("r", perturb_results(3.0, p_welch=math.nan)),
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
    assert cl.overlap_criterion(None).status == cl.NOT_MEASURED
    cmp = {"mean_overlap_at_k": 0.62, "pairs": [{"a": "x", "b": "y", "overlap_at_k": 0.62}]}
    assert cl.overlap_criterion(cmp).status == cl.MET
    assert cl.overlap_criterion(dict(cmp, mean_overlap_at_k=0.5)).status == cl.NOT_MET


def test_table_rendering_escapes():
    t = Table("t_1", "ΔPPL & co", ["name_x", "p"], [["a|b", fmt(0.00012)], ["50%", fmt(math.inf)]], note="α_1")
    md = to_markdown(t)
    assert "a\\|b" in md and "1.200e-04" in md and "∞" in md
    tex = to_latex(t)
    assert r"$\Delta$PPL \& co" in tex and r"name\_x" in tex and r"50\%" in tex and r"$\infty$" in tex
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
