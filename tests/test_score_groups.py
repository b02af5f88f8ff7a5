"""Score groups give byte-identical results to one pass; split_groups; scores.safetensors streamed tensor by tensor."""

import filecmp
import json

import pytest
import torch

from esa.config import DataConfig, ModelConfig, ProfileConfig, SelectionConfig
from esa.commands.profile import run_profile
from esa.scoregroups import split_groups
from esa.scorefile import ScoreFile
from esa.tensors import TensorInfo
from helpers import STORIES260K, TINYSTORIES_VAL

COMPARED = ("top_weights.csv", "bottom_weights.csv", "tensor_stats.csv", "score_stats.json")
METRICS = ("grad_x_weight", "grad_squared", "hutchinson_diag", "act_mag", "magnitude", "hessian_diag", "taylor", "obd")


def infos(sizes):
    return [TensorInfo(f"t{i}", (n,), None, "other", "weight") for i, n in enumerate(sizes)]


def test_split_groups_are_contiguous_balanced_and_exactly_n():
    tensors = infos([100, 10, 10, 100, 100, 10, 80])
    for n in range(1, 8):
        groups = split_groups(tensors, n)
        assert len(groups) == n
        assert [t for g in groups for t in g] == tensors  # contiguous, model order, nothing lost
    assert [sum(t.numel for t in g) for g in split_groups(tensors, 3)] == [120, 200, 90]
    assert len(split_groups(tensors, 50)) == len(tensors)
    assert split_groups(tensors, 1) == [tensors]


def _profile_runs(tmp_path, model_cfg, data, metric, mode, session, stability=False):
    # A few tensors keep it fast (the tail fits of tensor_stats cost ~0.1 s per tensor); embed and lm_head included.
    include = ["*layers.0.input_layernorm*", "*layers.0.post_attention_layernorm*", "model.norm.weight"] \
        if metric == "hessian_diag" else ["*embed*", "*lm_head*", "*layers.0.mlp.*"]
    outs = []
    for groups in (1, 3):
        config = ProfileConfig(
            model=model_cfg, data=data, out_dir=str(tmp_path / f"{metric}-{mode}-{groups}"),
            selection=SelectionConfig(metric=metric, mode=mode, topk=12, include=include,
                                      include_norms=metric == "hessian_diag", hutchinson_probes=1,
                                      hessian_budget=400, score_groups=groups),
            seeds=[0, 1], stability_check=stability, save_scores=True)
        run = run_profile(config, session=session)
        session = run["session"]
        manifest = json.loads((tmp_path / f"{metric}-{mode}-{groups}" / "experiment_manifest.json").read_text())
        assert manifest["scoring"]["score_groups"] == groups
        assert manifest["memory"]["measured_peak_bytes"] > 0 and manifest["memory"]["planned_peak_bytes"] > 0
        outs.append(tmp_path / f"{metric}-{mode}-{groups}")
    return outs, session


def _assert_identical(a, b, names):
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), (a.name, name)


def _check_metric(tmp_path, model_cfg, data, metric, session=None):
    for mode in ("per_layer", "global"):
        stability = metric == "grad_x_weight" and mode == "global"
        (one, three), session = _profile_runs(tmp_path, model_cfg, data, metric, mode, session, stability)
        names = COMPARED + ("scores.safetensors",)
        if stability:
            names += ("stability.json", "stability/top_weights_seed0.csv", "stability/top_weights_seed1.csv",
                      "stability/bottom_weights_seed1.csv")
        _assert_identical(one, three, names)
    return session


@pytest.fixture(scope="module")
def embedded_session():
    from esa.session import open_session

    data = DataConfig(seq_len=24, max_samples=4, batch_size=2)
    return ModelConfig(attn_implementation="eager"), data, open_session(ModelConfig(attn_implementation="eager"), data)


# hessian_diag makes one Hessian-vector product per weight (384 here, per batch and run): slow on a shared CPU; its
# group equivalence is also checked bit for bit at the scoring level (test_scoring.py).
@pytest.mark.parametrize("metric", [pytest.param(m, marks=pytest.mark.slow) if m == "hessian_diag" else m
                                    for m in METRICS])
def test_one_and_three_score_groups_give_identical_files_on_the_embedded_model(tmp_path, embedded_session, metric):
    model_cfg, data, session = embedded_session
    _check_metric(tmp_path, model_cfg, data, metric, session)


@pytest.mark.slow
def test_one_and_three_score_groups_give_identical_files_on_stories260k(tmp_path):
    if not (STORIES260K / "model.safetensors").exists() or not TINYSTORIES_VAL.exists():
        pytest.skip("../shared/models/stories260K or the TinyStories slice is absent")
    model_cfg = ModelConfig(model=str(STORIES260K), attn_implementation="eager")
    data = DataConfig(text_file=str(TINYSTORIES_VAL), seq_len=32, max_samples=4, batch_size=2)
    session = None
    for metric in METRICS:
        session = _check_metric(tmp_path, model_cfg, data, metric, session)


# ----------------------------------------------------------------------------------------------- scores.safetensors
def test_score_file_streams_tensors_and_reads_back_with_safetensors(tmp_path):
    from safetensors import safe_open

    tensors = [TensorInfo("a.weight", (3, 4), 0, "attn.q", "weight"), TensorInfo("b.weight", (5,), 1, "norm", "norm"),
               TensorInfo("c.weight", (2, 2), 1, "mlp.up", "weight")]
    values = {t.name: torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(tensors)}
    path = tmp_path / "scores.safetensors"
    with ScoreFile(path, tensors, {"metric": "magnitude", "n_batches": 0}) as f:
        f.add("a.weight", values["a.weight"])
        written = f.file.tell()
        f.add("c.weight", values["c.weight"])  # a tensor may be absent (act_mag skips some)
        assert f.file.tell() == written + 16  # bytes go to disk as each tensor arrives
        assert not path.exists()  # nothing visible before commit
        f.commit()
    with safe_open(path, "pt") as g:
        assert set(g.keys()) == {"a.weight", "c.weight"}
        assert g.metadata() == {"metric": "magnitude", "n_batches": "0"}
        for name in g.keys():
            assert torch.equal(g.get_tensor(name), values[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.safetensors"]


def test_score_file_left_uncommitted_leaves_nothing(tmp_path):
    tensors = [TensorInfo("a.weight", (3,), 0, "attn.q", "weight")]
    with pytest.raises(RuntimeError):
        with ScoreFile(tmp_path / "scores.safetensors", tensors, {}) as f:
            f.add("a.weight", torch.ones(3))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
