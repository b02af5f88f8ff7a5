"""`esa validate`: exact single-weight ablations (checked against an independent evaluation), statistics, resume."""

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from esa.cli.main import app
from esa.tensors import TensorInfo
from esa.metric_validation import metric_figures, precision_at_k, stratified_sample
from helpers import STORIES260K, TINYSTORIES_VAL

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


needs_stories = pytest.mark.skipif(not (STORIES260K / "config.json").exists() or not TINYSTORIES_VAL.exists(),
                                   reason="../shared/models/stories260K or the TinyStories text is absent")
STORIES = ["--model", STORIES260K, "--text-file", TINYSTORIES_VAL, "--seq-len", "64", "--max-samples", "3",
           "--batch-size", "3"]


@needs_stories
def test_delta_nll_equals_an_independent_evaluation_of_each_ablated_model(tmp_path):
    """Every row: a freshly loaded float32 model, the weight zeroed by hand, the Hugging Face mean loss over all
    windows in one batch, minus the intact one: equal to esa's delta_nll within 1e-5 nats."""
    from transformers import AutoModelForCausalLM

    from esa.config import DataConfig, ModelConfig
    from esa.session import open_session

    out = tmp_path / "v"
    result = run("validate", *STORIES, "--sample", "12", "--topk", "2", "--metrics", "magnitude,taylor",
                 "--n-bootstrap", "100", "--out-dir", out)
    assert result.exit_code == 0, result.output
    table = rows(out / "validate.csv")
    assert list(table[0]) == ["tensor", "flat_index", "row", "col", "expert", "source", "delta_nll", "magnitude",
                              "taylor"]
    assert sum("sample" in r["source"].split(";") for r in table) == 12 and len(table) >= 12
    assert any("top:taylor" in r["source"] for r in table) and any("top:magnitude" in r["source"] for r in table)
    windows = open_session(ModelConfig(model=str(STORIES260K), device="cpu"),
                           DataConfig(text_file=str(TINYSTORIES_VAL), seq_len=64, max_samples=3)).windows.input_ids
    model = AutoModelForCausalLM.from_pretrained(STORIES260K, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        base = model(input_ids=windows, labels=windows).loss.double().item()
        for r in table:
            w = params[r["tensor"]].view(-1)
            i = int(r["flat_index"])
            old = w[i].clone()
            w[i] = 0.0
            delta = model(input_ids=windows, labels=windows).loss.double().item() - base
            w[i] = old
            assert float(r["delta_nll"]) == pytest.approx(delta, abs=1e-5), r
            cols = params[r["tensor"]].shape[-1]
            assert (int(r["row"]), int(r["col"])) == divmod(i, cols)
    assert max(abs(float(r["delta_nll"])) for r in table) > 1e-4  # the check is not on no-ops only
    summary = json.loads((out / "validate.json").read_text())
    assert set(summary["metrics"]) == {"magnitude", "taylor"} and summary["n_sample"] == 12
    for f in summary["metrics"].values():
        assert -1 <= f["spearman_abs"] <= 1 and f["spearman_abs_ci95"][0] <= f["spearman_abs_ci95"][1]
    assert (out / "plots" / "scatter_taylor.png").stat().st_size > 0


@needs_stories
def test_an_interrupted_run_resumes_without_redoing_finished_ablations(tmp_path):
    out = tmp_path / "v"
    args = ["validate", *STORIES, "--sample", "10", "--topk", "1", "--metrics", "magnitude", "--n-bootstrap", "100",
            "--out-dir", out]
    assert run(*args).exit_code == 0
    first = (out / "validate.csv").read_text()
    lines = (out / "ablations.jsonl").read_text().splitlines()
    (out / "ablations.jsonl").write_text("\n".join(lines[:5]) + "\n{\"torn")  # baseline + 4 rows, a torn line
    (out / "experiment_manifest.json").unlink()
    (out / "validate.csv").unlink()
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert (out / "validate.csv").read_text() == first
    keys = [json.loads(x)["key"] for x in (out / "ablations.jsonl").read_text().splitlines() if x.startswith("{\"key")]
    assert len(keys) == len(set(keys)) == len(lines)  # each ablation exactly once
    assert "finished run" in run(*args).output  # finished: needs --overwrite
    (out / "experiment_manifest.json").unlink()  # unfinished again: another configuration is refused
    changed = run("validate", *STORIES, "--sample", "11", "--topk", "1", "--metrics", "magnitude", "--out-dir", out)
    assert changed.exit_code == 2 and "another configuration" in changed.output, changed.output


def test_stratified_sample_is_proportional_seeded_and_distinct():
    tensors = [TensorInfo("a", (100, 10), 0, "mlp.up", "weight"), TensorInfo("b", (10, 10), 0, "mlp.down", "weight"),
               TensorInfo("c", (2,), 0, "norm", "norm")]
    s = stratified_sample(tensors, 111, seed=3)
    counts = {n: sum(t == n for t, _ in s) for n in "abc"}
    assert len(s) == len(set(s)) == 111 and counts["c"] >= 1 and counts["a"] > 8 * counts["b"]
    assert s == stratified_sample(tensors, 111, seed=3) and s != stratified_sample(tensors, 111, seed=4)
    assert all(0 <= i < t.numel for t in tensors for n, i in s if n == t.name)
    assert len(stratified_sample(tensors, 10_000, seed=0)) == 1102  # at most every weight


def test_statistics_on_known_relations():
    assert precision_at_k(np.array([5.0, 4, 3, 2, 1]), np.array([1.0, 4, 3, 9, 0]), 2) == 0.5
    rng = np.random.default_rng(0)
    delta = rng.normal(size=300)
    f = metric_figures(-delta, delta, "taylor", 10, 200, 0)  # a signed metric exactly anti-correlated
    assert f["spearman_abs"] == pytest.approx(1.0) and f["spearman_signed"] == pytest.approx(-1.0)
    assert f["kendall_signed"] == pytest.approx(-1.0) and f["precision_at_k"] == 1.0
    noise = metric_figures(rng.normal(size=300), delta, "magnitude", 10, 200, 0)
    lo, hi = noise["spearman_abs_ci95"]
    assert lo < noise["spearman_abs"] < hi and lo < 0 < hi


def test_bad_flags_are_one_line_errors(tmp_path):
    for args, match in [(["--perturb", "gauss_noise"], "zero or sign_flip"), (["--metrics", "fisher"], "unknown --metric"),
                        (["--sample", "3"], "--sample must be at least 10")]:
        result = run("validate", *args, "--out-dir", tmp_path / "v")
        assert result.exit_code == 2 and match in result.output and "Traceback" not in result.output, result.output


def test_report_shows_which_metric_predicts_the_true_effect(tmp_path):
    out = tmp_path / "v"
    result = run("validate", "--seq-len", "32", "--max-samples", "2", "--sample", "12", "--topk", "1", "--metrics",
                 "magnitude,taylor", "--n-bootstrap", "100", "--out-dir", out)
    assert result.exit_code == 0, result.output
    assert "Spearman" in result.output and "taylor" in result.output
    report = run("report", out, "--out", tmp_path / "r")
    assert report.exit_code == 0, report.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Which metric predicts the true effect?" in md
    section = md.split("## Which metric predicts the true effect?")[1].split("\n## ")[0]
    summary = json.loads((out / "validate.json").read_text())
    assert "| taylor |" in section and "| magnitude |" in section
    assert f"{summary['metrics']['taylor']['spearman_abs']:.4g}" in section
    assert (tmp_path / "r" / "figures" / "validate_v_taylor.png").exists()
