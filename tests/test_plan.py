"""`esa plan`: the memory/time model (pure functions) and the command on shape-true configs (no weights)."""

import json
import shlex

import pytest
from typer.testing import CliRunner

from esa.cli.main import app
from esa.errors import EsaError
from esa.planning import GiB, HEADROOM, PARTS, ModelShape, Workload, parse_size, plan, score_parts
from esa.tensors import TensorInfo
from helpers import REPO, SHARED

CONFIGS = SHARED / "models" / "configs"
LLAMA = CONFIGS / "llama-3.1-8b"
MIXTRAL = CONFIGS / "mixtral-8x7b"
needs_configs = pytest.mark.skipif(not (LLAMA / "config.json").exists(), reason="../shared/models/configs absent")


def shape(sizes=(1000, 4000, 2000, 3000)):
    tensors = tuple(TensorInfo(f"t{i}", (n,), i, "mlp.up", "weight") for i, n in enumerate(sizes))
    return ModelShape(n_params=20_000, active_params=20_000, layers=2, hidden=8, kv=4, intermediate=16, heads=2,
                      vocab=50, tensors=tensors)


def test_parse_size():
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("24GiB") == 24 * GiB
    assert parse_size("1.5TB") == 1.5e12
    assert parse_size("123") == 123
    with pytest.raises(EsaError, match="device-memory"):
        parse_size("eighty")


def test_parts_follow_the_documented_formulas():
    s, w = shape(), Workload(metric="grad_x_weight", seq_len=10, dtype_bytes=2)
    parts = score_parts(s, w, batch=3, groups=2)
    assert parts["weights"] == 20_000 * 2
    assert parts["score_buffers"] == 4 * 5000  # groups [1000, 4000] and [2000, 3000]: one is held at a time
    assert parts["gradients"] == 4000 * 2  # one gradient at a time: the largest tensor's
    assert parts["activations"] == 3 * 10 * (22 * 8 + 6 * 4 + 8 * 16) * 2 * 2  # B·L·per-token-layer·s·layers
    assert parts["logits"] == 30 * 50 * (2 + 8)  # 30 tokens fit one chunk
    hutch = score_parts(s, Workload(metric="hutchinson_diag", seq_len=10, dtype_bytes=2), 3, 1)
    assert hutch["gradients"] == 4000 * (2 * 2 + 8)  # one tensor's ∇ and H z, and its float32 fold
    assert hutch["probes"] == 10_000 * 2  # z over every scored tensor, the tangent of the whole pass
    assert hutch["score_buffers"] == 4 * 10_000
    per_layer = (22 * 8 + 6 * 4 + 8 * 16) * 2
    # every layer's input and tangent, one layer recomputed (4×), SDPA math attention of that layer
    assert hutch["activations"] == 30 * (2 * 8 * 2 * 2 + 4 * per_layer + 32 * 2 * 10)
    assert hutch["logits"] == 2 * 30 * 50 * (2 + 8)  # with tangents
    obd = score_parts(s, Workload(metric="obd", seq_len=10, dtype_bytes=2), 3, 1)
    assert obd["gradients"] == 4000 * (2 * 2 + 16)
    exact = score_parts(s, Workload(metric="hessian_diag", seq_len=10, dtype_bytes=2, attention="eager"), 3, 1)
    assert exact["gradients"] == 10_000 * 2 + 4000 * 2  # double backward: every gradient with its graph, one H z
    assert exact["activations"] == 2 * 30 * (per_layer + 6 * 2 * 10) * 2


def test_groups_and_batch_size_are_the_fewest_and_largest_that_fit():
    s = shape()
    w = Workload(command="profile", metric="grad_x_weight", seq_len=10, dtype_bytes=2, n_windows=64)
    one = sum(score_parts(s, w, 1, 1).values())
    tight = int((one - 4 * 4000) / HEADROOM)  # one group does not fit, two do
    p = plan(s, w, tight)
    (score,) = p.phases
    assert p.fits and score.score_groups == 2
    assert score.peak_bytes <= tight * HEADROOM
    assert sum(score_parts(s, w, score.batch_size + 1, 2).values()) > tight * HEADROOM or score.batch_size == 64
    assert score.peak_bytes == sum(score.parts.values()) and set(score.parts) == set(PARTS)
    too_small = plan(s, w, 20_000 * 2)
    assert not too_small.fits and "the largest part is workspace" in too_small.reason
    forced = plan(s, Workload(**{**w.__dict__, "score_groups": 4, "batch_size": 2}), 10**9)
    assert forced.score_groups == 4 and forced.batch_size == 2


def _runbook_argv():
    lines = [l.strip() for l in (REPO / "docs" / "RUNBOOK.md").read_text().splitlines()]
    return [shlex.split(l)[2:] for l in lines if l.startswith("python phase1_runner_enhanced.py ")]


def _plan_json(argv):
    result = CliRunner().invoke(app, ["plan", *argv, "--json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.output)


@needs_configs
def test_the_nine_runbook_commands_on_llama_3_1_8b_80gb():
    commands = _runbook_argv()
    assert len(commands) == 9
    outcomes, plans = [], []
    for argv in commands:
        argv = [str(LLAMA) if a == "$M" else a for a in argv]
        code, p = _plan_json([*argv, "--dtype", "bfloat16", "--seq-len", "2048", "--device-memory", "80GB"])
        assert {"peak_bytes", "score_groups", "batch_size", "fits"} <= set(p)
        for phase in p["phases"]:  # the breakdown adds up
            assert phase["peak_bytes"] == sum(phase["parts"].values())
            assert set(phase["parts"]) == set(PARTS)
        assert p["peak_bytes"] == max(ph["peak_bytes"] for ph in p["phases"])
        assert code == (0 if p["fits"] else 1)
        outcomes.append((argv[argv.index("--metric") + 1], p["fits"], p["reason"]))
        plans.append(p)
    # All nine fit, command 4 (hutchinson_diag) included: forward-over-reverse sweeps one layer at a time.
    assert [fits for _, fits, _ in outcomes] == [True] * 9, outcomes
    assert [metric for metric, _, _ in outcomes].count("hutchinson_diag") == 1
    # Under torchrun every rank holds the whole model: the README and the RUNBOOK quote command 6's plan per GPU.
    assert commands[5][commands[5].index("--perturb") + 1] == "zero"
    evaluation = max(ph["peak_bytes"] for ph in plans[5]["phases"] if ph["name"] != "score")
    for doc in ("README.md", "docs/RUNBOOK.md"):
        text = " ".join((REPO / doc).read_text().split())
        assert f"a peak of {plans[5]['peak_bytes'] / GiB:.1f} GiB per GPU" in text, doc
        assert f"{evaluation / GiB:.1f} GiB in baseline and trials" in text or \
            f"baseline and trials {evaluation / GiB:.1f} GiB" in text, doc


@needs_configs
def test_runbook_command_4_fits_80gb_at_2048_tokens():
    """Issue 14: hutchinson_diag on '*layers.[0-3].mlp.*' of Llama-3.1-8B, bf16, 2048 tokens, within 80 GB, and
    most of the peak is the weights (the double-backward plan was 120 GiB)."""
    argv = [str(LLAMA) if a == "$M" else a for a in _runbook_argv()[3]]
    assert argv[argv.index("--metric") + 1] == "hutchinson_diag"
    code, p = _plan_json([*argv, "--dtype", "bfloat16", "--seq-len", "2048", "--device-memory", "80GB"])
    assert code == 0 and p["fits"] and p["peak_bytes"] < 40 * GiB
    score = next(ph for ph in p["phases"] if ph["name"] == "score")
    assert score["parts"]["weights"] > score["parts"]["activations"]


@needs_configs
def test_mixtral_on_one_141gb_gpu_needs_score_groups():
    code, p = _plan_json(["--model", str(MIXTRAL), "--dtype", "bfloat16", "--seq-len", "1024", "--metric",
                          "grad_x_weight", "--mode", "global", "--max-samples", "64", "--batch-size", "1",
                          "--device-memory", "141GB"])
    assert code == 0 and p["fits"] and p["score_groups"] > 1  # 187 GB of fp32 scores cannot be held at once
    score = next(ph for ph in p["phases"] if ph["name"] == "score")
    assert score["parts"]["weights"] == 46_702_792_704 * 2


def test_plan_refuses_without_device_memory_on_a_cpu_machine():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    result = CliRunner().invoke(app, ["plan", "--json"])
    assert result.exit_code != 0 and "--device-memory" in result.output


def test_plan_of_the_embedded_model_fits_a_small_device():
    code, p = _plan_json(["--device-memory", "4GB", "--metric", "hutchinson_diag", "--max-samples", "8"])
    assert code == 0 and p["fits"] and p["time_s"] > 0


@needs_configs
def test_a_batch_size_that_cannot_fit_the_gpu_is_refused_before_loading(monkeypatch):
    """On CUDA (faked: this test needs no GPU) the plan refuses before any weight is read, with its numbers."""
    import types

    import torch

    import esa.modeling
    from esa.config import DataConfig, ModelConfig, SelectionConfig
    from esa.planning import refuse_if_it_cannot_fit

    monkeypatch.setattr(esa.modeling, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        total_memory=80 * 10**9))
    model_cfg = ModelConfig(model=str(LLAMA), dtype="bfloat16", device="cuda")
    refuse_if_it_cannot_fit(model_cfg, SelectionConfig(), DataConfig(seq_len=2048, batch_size=1, max_samples=8),
                            command="profile")  # fits: nothing raised
    with pytest.raises(EsaError, match=r"--batch-size 8 cannot fit this GPU by the plan: phase score needs .* GiB"):
        refuse_if_it_cannot_fit(model_cfg, SelectionConfig(), DataConfig(seq_len=2048, batch_size=8, max_samples=8),
                                command="profile")
