"""The plan-vs-measured and selection-vs-scoring benchmarks run on tiny sizes (their real sizes are for the lead)."""

import pytest

from bench.plan_vs_measured import CASES, measure
from bench.selection_vs_scoring import _parse, run


def test_plan_vs_measured_measures_one_case_in_process():
    r = measure("score", "hutchinson_diag", 2, hidden=32, layers=1, vocab=128, seq_len=8, windows=2, batch_size=1)
    assert r["measured_peak_bytes"] >= r["rss_after_imports_bytes"] > 0
    assert r["planned_peak_bytes"] > 0 and r["planned_over_measured"] > 0
    assert r["parts"]["score"]["score_buffers"] > 0 and r["score_groups"] == 2
    assert {c[1] for c in CASES} == {"grad_x_weight", "hutchinson_diag"} and {c[2] for c in CASES} == {1, 3}


def test_selection_vs_scoring_times_both_phases():
    r = run(_parse(["--hidden", "32", "--intermediate", "64", "--vocab", "128", "--heads", "2", "--kv-heads", "2",
                    "--seq-len", "8", "--topk", "5", "--device", "cpu"]))
    assert r["scoring_s"] > 0 and r["selection_s"] > 0 and r["statistics_s"] > 0 and r["ratio"] > 0
    assert r["selection_and_statistics_s"] == pytest.approx(r["selection_s"] + r["statistics_s"])
