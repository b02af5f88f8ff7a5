"""`esa profile` and `esa compare` end to end, and the planted super weight found by every gradient metric."""

import csv
import json

import pytest
from typer.testing import CliRunner

from esa.cli.main import app
from helpers import planted_super_weight_model, save_model

runner = CliRunner()
FAST = ["--seq-len", "64", "--max-samples", "8", "--batch-size", "4"]
PROFILE_FILES = ("top_weights.csv", "bottom_weights.csv", "tensor_stats.csv", "score_stats.json", "locations.csv",
                 "ccdf.csv", "metrics.json", "config.json", "experiment_manifest.json")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    model, info = planted_super_weight_model()
    return save_model(model, tmp_path_factory.mktemp("planted") / "model"), info


def test_grad_squared_on_embedded_model_writes_every_file(tmp_path):
    out = tmp_path / "run"
    result = run("profile", "--metric", "grad_squared", "--topk", "25", *FAST, "--save-plots", "--save-scores",
                 "--stability-check", "--seeds", "0,1,2", "--out-dir", out)
    assert result.exit_code == 0, result.output
    for name in PROFILE_FILES + ("stability.json", "scores.safetensors", "stability/top_weights_seed0.csv",
                                 "stability/bottom_weights_seed2.csv"):
        assert (out / name).exists(), name
    for stem in ("score_ccdf", "heatmap_topk_count", "heatmap_score_mass", "top_locations"):
        assert (out / "plots" / f"{stem}.png").stat().st_size > 0 and (out / "plots" / f"{stem}.pdf").exists()
    top = rows(out / "top_weights.csv")
    assert list(top[0]) == ["rank", "tensor", "layer", "component", "expert", "row", "col", "flat_index", "score",
                            "weight"]
    n_tensors = len(rows(out / "tensor_stats.csv"))
    assert len(top) == 25 * n_tensors  # per_layer: k in every tensor (all have more than 25 weights)
    scores = [float(r["score"]) for r in top if r["tensor"] == top[0]["tensor"]]
    assert scores == sorted(scores, reverse=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "grad_squared" and 0 <= metrics["topk_share_embed"] <= 1
    stab = json.loads((out / "stability.json").read_text())
    assert set(stab["pairwise_jaccard"]) == {"0-1", "0-2", "1-2"}
    assert all(0 <= v <= 1 for v in stab["pairwise_jaccard"].values()) and stab["per_tensor_mean_jaccard"]
    assert "Jaccard" in result.output
    stats = json.loads((out / "score_stats.json").read_text())
    assert {"model", "components", "tensors"} <= set(stats)
    assert stats["model"]["numel"] == metrics["scored_weights"]
    # The CCDF the report draws: per component, P(S >= x) rises as x falls, from 1/numel at the maximum score.
    ccdf = rows(out / "ccdf.csv")
    for comp, c in stats["components"].items():
        points = [(float(r["score"]), float(r["ccdf"])) for r in ccdf if r["component"] == comp]
        assert points and points[0][0] == pytest.approx(c["max"], rel=1e-6)
        assert points[0][1] == pytest.approx(1 / c["numel"])
        assert all(x1 >= x2 and p1 <= p2 for (x1, p1), (x2, p2) in zip(points, points[1:])) and points[-1][1] <= 1
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert manifest["kernels"]["backend"] == "torch"  # CPU tensors take the torch path unless forced
    assert {"load", "score", "selection", "statistics"} <= set(manifest["timings_s"])  # phases, none overlapping
    assert sum(v for k, v in manifest["timings_s"].items() if k != "total") <= manifest["timings_s"]["total"]


@pytest.mark.parametrize("metric,extra", [
    ("grad_x_weight", []),
    ("grad_squared", []),
    ("hutchinson_diag", ["--hutchinson-probes", "4"]),
    ("hessian_diag", ["--include", "*layers.1.mlp.down_proj*", "--hessian-budget", "4096"]),
    ("taylor", []),
    ("obd", ["--hutchinson-probes", "2", "--include", "*mlp.down_proj*"]),  # Hutchinson noise on lm_head outranks it
])
def test_planted_super_weight_ranks_first_in_global_mode(planted, tmp_path, metric, extra):
    model_dir, info = planted
    out = tmp_path / metric
    result = run("profile", "--model", model_dir, "--metric", metric, "--mode", "global", "--topk", "5", *FAST,
                 *extra, "--out-dir", out)
    assert result.exit_code == 0, result.output
    first = rows(out / "top_weights.csv")[0]
    assert first["rank"] == "0" and first["tensor"] == info["tensor"]
    assert (int(first["layer"]), int(first["row"]), int(first["col"])) == (info["layer"], info["row"], info["col"])
    assert first["component"] == "mlp.down" and int(first["flat_index"]) == info["flat_index"]


def test_signed_metric_keeps_its_sign_in_csv_and_saved_scores_and_drives_perturb(planted, tmp_path):
    """taylor: top-k by |S|, signed S in top_weights.csv and scores.safetensors; the planted weight's zeroing
    raises the loss, so its estimate is positive; esa perturb selects with it as with any metric."""
    from safetensors.torch import load_file

    model_dir, info = planted
    out = tmp_path / "taylor"
    result = run("profile", "--model", model_dir, "--metric", "taylor", "--topk", "20", *FAST, "--save-scores",
                 "--save-plots", "--out-dir", out)
    assert result.exit_code == 0, result.output
    top = rows(out / "top_weights.csv")
    saved = load_file(out / "scores.safetensors")
    assert any(float(r["score"]) < 0 for r in top) and any(float(r["score"]) > 0 for r in top)
    for name in {r["tensor"] for r in top}:
        mine = [float(r["score"]) for r in top if r["tensor"] == name]
        assert [abs(x) for x in mine] == sorted((abs(x) for x in mine), reverse=True)
        flat = saved[name].reshape(-1)
        assert mine == [float(flat[int(r["flat_index"])]) for r in top if r["tensor"] == name]
        assert float(flat.abs().max()) == pytest.approx(abs(mine[0]))
    planted_row = next(r for r in top if r["tensor"] == info["tensor"] and r["rank"] == "0")
    assert int(planted_row["flat_index"]) == info["flat_index"] and float(planted_row["score"]) > 0
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert manifest["scoring"]["signed"] is True
    assert (out / "plots" / "top_locations.png").stat().st_size > 0 and "Warning" not in result.output
    result = run("perturb", "--model", model_dir, "--metric", "taylor", "--mode", "global", "--topk", "1", *FAST,
                 "--seeds", "0", "--controls", "none", "--n-bootstrap", "200", "--out-dir", tmp_path / "p")
    assert result.exit_code == 0, result.output
    chosen = rows(tmp_path / "p" / "sets" / "super_seed0.csv")
    assert [int(r["flat_index"]) for r in chosen] == [info["flat_index"]] and float(chosen[0]["score"]) > 0


def test_compare_two_metrics(tmp_path):
    for metric in ("grad_x_weight", "magnitude"):
        assert run("profile", "--metric", metric, "--mode", "global", "--topk", "50", *FAST, "--save-scores",
                   "--out-dir", tmp_path / metric).exit_code == 0
    result = run("compare", tmp_path / "grad_x_weight", tmp_path / "magnitude", "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    pair = cmp["pairs"][0]
    assert 0 <= pair["jaccard"] <= pair["overlap_at_k"] <= 1 and -1 <= pair["spearman"] <= 1
    assert pair["basis"] == "exact scores on the union"
    assert (tmp_path / "cmp" / "overlap.csv").exists()
    # The same run against itself agrees perfectly.
    same = run("compare", tmp_path / "magnitude", tmp_path / "magnitude", "--out", tmp_path / "cmp2")
    assert json.loads((tmp_path / "cmp2" / "compare.json").read_text())["pairs"][0]["jaccard"] == 1.0, same.output


def test_profile_refusals_are_one_line_errors(tmp_path):
    for args, match in [
        (["--metric", "hessian_diag"], "exceed --hessian-budget"),
        (["--metric", "fisher"], "unknown --metric"),
        (["--topk", "0"], "--topk must be at least 1"),
        (["--mode", "per_head"], "unknown --mode"),
        (["--include", "nothing*"], "no tensor matches"),
        (["--stability-check", "--seeds", "0"], "at least two --seeds"),
        (["--seeds", "a,b"], "--seeds"),
    ]:
        result = run("profile", *FAST, *args, "--out-dir", tmp_path / "r")
        assert result.exit_code == 2 and match in result.output and "Traceback" not in result.output, (args, result.output)
        assert not (tmp_path / "r" / "experiment_manifest.json").exists()


def test_tensors_command_lists_components():
    result = run("tensors", "--include", "*layers.0.*")
    assert result.exit_code == 0, result.output
    assert "mlp.down" in result.output and "attn.q" in result.output


def test_compare_ranks_a_signed_metric_by_its_magnitude(tmp_path):
    """taylor ranks by |S| = |Ḡ ⊙ w|; on one batch that is grad_x_weight's |g ⊙ w|, so the exact-score Spearman is 1
    (on the raw signed S it would not be: half of the union has S < 0)."""
    one_batch = ["--max-samples", "2", "--batch-size", "2", "--seq-len", "32"]
    for metric in ("grad_x_weight", "taylor"):
        assert run("profile", "--metric", metric, "--mode", "global", "--topk", "40", *one_batch, "--save-scores",
                   "--out-dir", tmp_path / metric).exit_code == 0
    result = run("compare", tmp_path / "grad_x_weight", tmp_path / "taylor", "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    pair = json.loads((tmp_path / "cmp" / "compare.json").read_text())["pairs"][0]
    assert pair["basis"] == "exact scores on the union"
    assert pair["jaccard"] == 1.0 and pair["spearman"] > 0.999, pair
