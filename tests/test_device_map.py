"""A model split across devices with accelerate (``--device-map`` / ``--max-memory``, :mod:`esa.placement`).

No GPU here: the per-device logic is checked on CPU — placement with ``meta`` standing in for a second device (no
numbers are read from it), weights that accelerate offloads (hooks that copy them in at every forward, as with
``cpu``/``disk`` entries next to a GPU), the exact top-k merge across tensors, perturb/restore bit for bit — and
every command run with an all-``cpu`` device map must write the same files as the run without one (manifests and
config.json aside, which record the device map).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from esa import placement
from esa.cli.main import app
from esa.errors import EsaError
from esa.evaluate import evaluate
from esa.fingerprint import model_fingerprint, named_fingerprints
from esa.perturbation import PerturbSpec, perturbed
from esa.scoring import compute_scores
from esa.selection import WeightSet, merge_candidates, tensor_candidates
from esa.tensors import TensorInfo, select_tensors
from helpers import REPO, SHARED, random_model, save_random_model

runner = CliRunner()
FAST = ["--seq-len", "32", "--max-samples", "6", "--batch-size", "3"]
RECORDS = {"experiment_manifest.json", "config.json"}  # they record the device map; every other file must match
# (perturb's trials.jsonl too, once each trial's wall time is left out)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def ids(n: int = 4, length: int = 16, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def offloaded_copy(seed: int = 0):
    """A random Llama whose every weight accelerate offloads to CPU memory (parameters on ``meta``, copied in for
    each forward): what ``cpu`` entries of a device map do when a GPU computes."""
    from accelerate import cpu_offload

    model = random_model("llama", seed=seed)
    cpu_offload(model, execution_device="cpu")
    return model


# ----------------------------------------------------------------------------------------------- parsing
def test_max_memory_items_and_one_string_parse_alike():
    one = placement.parse_max_memory("0=70GiB,1=70GiB,cpu=200GiB")
    assert one == {0: 70 * 2**30, 1: 70 * 2**30, "cpu": 200 * 2**30}
    assert placement.parse_max_memory(",".join(["0=70GiB", "cuda:1=70GiB", "CPU=200GiB"])) == one
    assert placement.parse_max_memory("disk=1000GB, mps=500MB") == {"disk": 10**12, "mps": 500 * 10**6}
    assert placement.parse_max_memory(None) is None and placement.parse_max_memory("") is None


@pytest.mark.parametrize("bad", ["0", "=5GB", "gpu=1GiB", "0=lots", "0=0", "cpu="])
def test_bad_max_memory_is_one_line(bad):
    with pytest.raises(EsaError, match="--max-memory") as e:
        placement.parse_max_memory(bad)
    assert "\n" not in str(e.value)


def test_device_map_strategies_and_files(tmp_path):
    for strategy in ("auto", "balanced", "sequential"):
        assert placement.parse_device_map(strategy) == strategy
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"model.embed_tokens": 0, "model.layers": "cuda:1", "model.norm": "1",
                                "lm_head": "cpu", "model.rotary_emb": "disk"}))
    assert placement.parse_device_map(str(path)) == {"model.embed_tokens": 0, "model.layers": "cuda:1",
                                                     "model.norm": 1, "lm_head": "cpu", "model.rotary_emb": "disk"}


@pytest.mark.parametrize("content, match", [(None, "no such file"), ("{not json", "not a readable JSON"),
                                            ("[1, 2]", "must be an object"), ("{}", "must be an object"),
                                            ('{"lm_head": "tpu"}', "not a device"),
                                            ('{"lm_head": -1}', "not a device")])
def test_bad_device_map_is_one_line(tmp_path, content, match):
    path = tmp_path / "map.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EsaError, match=match) as e:
        placement.parse_device_map(str(path))
    assert "\n" not in str(e.value)


def test_offload_rules_without_loading():
    """cpu next to a GPU offloads, cpu alone does not; disk always does (what a mocked CUDA machine would see)."""
    assert placement.offloads({"model": 0, "lm_head": "cpu"}, None)
    assert placement.offloads({"model": "cpu", "lm_head": "disk"}, None)
    assert not placement.offloads({"model": "cpu", "lm_head": "cpu"}, None)
    assert not placement.offloads({"model": 0, "lm_head": 1}, None)
    assert not placement.offloads("auto", None)  # known once placed: is_offloaded
    assert placement.uses_gpu({"a": "cuda:0"}, None) and not placement.uses_gpu({"a": "cpu"}, None)
    assert not placement.uses_gpu("auto", {"cpu": 10**9})


def test_flag_conflicts_are_refused_before_loading():
    from esa.modeling import load_model

    with pytest.raises(EsaError, match="--max-memory needs --device-map"):
        load_model(None, max_memory="cpu=1GiB")
    with pytest.raises(EsaError, match="exclusive"):
        load_model(None, device="cpu", device_map="auto")


# ----------------------------------------------------------------------------------------------- placement
def test_inputs_go_to_the_embedding_and_the_loss_to_the_head():
    """With the head hooked onto another device (``meta`` stands in for it: placement only), the token ids are
    sent to the embedding's device and the head's device is read from accelerate's hook."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = random_model("llama")
    add_hook_to_module(model.lm_head, AlignDevicesHook(execution_device="meta"))
    assert model.lm_head.weight.device.type == "meta"
    assert placement.input_device(model) == torch.device("cpu")
    assert placement.module_device(model.lm_head) == torch.device("meta")
    assert placement.module_device(model.model.embed_tokens) == torch.device("cpu")


def test_each_score_is_allocated_with_its_tensor():
    """A tensor on another device (``meta``) gets its score buffer there; the others stay on CPU."""
    model = random_model("llama")
    tensors = select_tensors(model)
    moved = tensors[1][0].name
    tensors = [(info, p.detach().to("meta") if info.name == moved else p) for info, p in tensors]
    scores = compute_scores(model, tensors, None, "magnitude").scores
    assert scores[moved].device.type == "meta"
    assert {s.device.type for name, s in scores.items() if name != moved} == {"cpu"}


@pytest.mark.parametrize("metric", ["magnitude", "act_mag"])
def test_offloaded_model_scores_equal_the_plain_model(metric):
    plain, offloaded = random_model("llama"), offloaded_copy()
    assert placement.is_offloaded(offloaded) and not placement.is_offloaded(plain)
    a = compute_scores(plain, select_tensors(plain), ids(), metric, batch_size=2).scores
    b = compute_scores(offloaded, select_tensors(offloaded), ids(), metric, batch_size=2).scores
    assert list(a) == list(b)
    for name in a:
        assert b[name].device.type == "cpu" and torch.equal(a[name], b[name]), name


def test_gradient_metrics_are_refused_on_an_offloaded_model():
    model = offloaded_copy()
    for metric in ("grad_x_weight", "hutchinson_diag", "taylor"):
        with pytest.raises(EsaError, match=f"--metric {metric} needs gradients"):
            compute_scores(model, select_tensors(model), ids(), metric)


def test_evaluation_of_an_offloaded_and_a_placed_model_equals_the_plain_one():
    x = ids()
    reference = evaluate(random_model("llama"), x, batch_size=2)
    assert (evaluate(offloaded_copy(), x, batch_size=2).nll == reference.nll).all()
    placed = placement.place_model(random_model("llama"), "auto", {"cpu": 10**9})
    assert {p.device.type for p in placed.parameters()} == {"cpu"}
    assert (evaluate(placed, x, batch_size=2).nll == reference.nll).all()
    split = placement.place_model(random_model("llama"), {"model": "cpu", "lm_head": "disk"}, None)
    assert placement.is_offloaded(split) and placement.devices_of(split) == ["cpu", "disk"]
    result = evaluate(split, x, batch_size=2)
    assert (result.nll == reference.nll).all() and (result.correct == reference.correct).all()


def test_weights_per_device_follow_the_longest_prefix():
    model = random_model("llama")
    per = placement.weight_bytes_per_device(model, {"model": 0, "model.layers.1": 1, "lm_head": "cpu"})
    size = {n: p.numel() * 4 for n, p in model.named_parameters()}
    assert per["cuda:1"] == sum(v for n, v in size.items() if n.startswith("model.layers.1."))
    assert per["cpu"] == size["lm_head.weight"]
    assert sum(per.values()) == sum(size.values())
    with pytest.raises(EsaError, match="places no module"):
        placement.weight_bytes_per_device(model, {"model": 0})


def test_score_groups_of_a_split_model_fit_every_gpu(monkeypatch):
    """With CUDA mocked: a split model gets the fewest score groups with which each GPU's share fits."""
    from types import SimpleNamespace

    from esa.planning import planned_groups

    model = random_model("llama")
    model.hf_device_map = {"model": 0, "lm_head": 1}
    scored = [t for t, _ in select_tensors(model)]
    workload = dict(command="profile", metric="grad_x_weight", seq_len=16, n_windows=4, batch_size=1,
                    hutchinson_probes=8, device="cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=1 << 40))
    assert planned_groups(model, scored, **workload) == 1
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=1 << 10))
    assert planned_groups(model, scored, **workload) == len(scored)  # nothing fits: the most groups


# ----------------------------------------------------------------------------------------------- top-k merge
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_of_candidates_equals_topk_over_the_concatenation(largest, seed):
    """Tensors on different devices each send only their best k (on CPU); the merge is the global top-k."""
    g = torch.Generator().manual_seed(seed)
    sizes = [7, 300, 1, 64, 129]
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    scores = {f"t{i}": torch.rand(n, generator=g).to(devices[i % len(devices)]) for i, n in enumerate(sizes)}
    infos = [TensorInfo(name, (s.numel(),), i, "mlp.up", "weight") for i, (name, s) in enumerate(scores.items())]
    for k in (1, 5, 40, sum(sizes)):
        cands = {name: tensor_candidates(name, s, k, largest=largest) for name, s in scores.items()}
        assert all(c.values.device.type == "cpu" and c.values.numel() == min(k, scores[n].numel())
                   for n, c in cands.items())
        merged = merge_candidates(infos, cands, k, "global", largest=largest)
        flat = torch.cat([s.cpu() for s in scores.values()])
        values, where = torch.topk(flat, k, largest=largest)
        offsets = torch.tensor([0] + sizes).cumsum(0)
        expected = [(infos[int(torch.searchsorted(offsets, w, right=True)) - 1].name,
                     int(w - offsets[int(torch.searchsorted(offsets, w, right=True)) - 1])) for w in where]
        assert list(zip(merged.tensor, merged.flat_index.tolist())) == expected
        assert torch.equal(torch.tensor(merged.score, dtype=torch.float32), values)


# ----------------------------------------------------------------------------------------------- perturb
def _weights(model) -> WeightSet:
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight",
             "model.layers.1.self_attn.q_proj.weight"]
    flat = [3, 17, 100, 5]
    import numpy as np

    return WeightSet(names, np.array(flat), np.zeros(len(names)), np.arange(len(names)), "top_k", {})


@pytest.mark.parametrize("kind", ["zero", "sign_flip", "gauss_noise", "bit_flip"])
def test_perturb_and_restore_in_place_on_offloaded_weights(kind):
    """The same perturbation of the offloaded model (through accelerate's CPU copies) changes the loss exactly as
    on the plain model, and restoring gives the weights back bit for bit."""
    x = ids()
    plain, offloaded = random_model("llama"), offloaded_copy()
    spec = PerturbSpec(kind, scale=0.5, prob=1.0)
    before = model_fingerprint(offloaded)
    assert before == model_fingerprint(plain)
    params = placement.weight_tensors(offloaded)
    with perturbed(dict(plain.named_parameters()), _weights(plain), spec, seed=3):
        expected = evaluate(plain, x, batch_size=2).nll
    with perturbed(params, _weights(offloaded), spec, seed=3) as applied:
        assert applied.n_weights == 4
        assert (evaluate(offloaded, x, batch_size=2).nll == expected).all()
        assert model_fingerprint(offloaded) != before
    assert model_fingerprint(offloaded) == before
    assert named_fingerprints(placement.weight_tensors(offloaded).items()) == \
        named_fingerprints(plain.named_parameters())


def test_perturbing_a_meta_parameter_is_refused():
    model = offloaded_copy()
    with pytest.raises(EsaError, match="offloaded"):
        with perturbed(dict(model.named_parameters()), _weights(model), PerturbSpec("zero"), seed=0):
            pass


# ----------------------------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_map")
    model = save_random_model("llama", root / "model")
    all_cpu = root / "all_cpu.json"
    all_cpu.write_text(json.dumps({"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                                   "model.rotary_emb": "cpu", "lm_head": "cpu"}))
    disk = root / "disk.json"
    disk.write_text(json.dumps({"model": "cpu", "lm_head": "disk"}))
    return {"root": root, "model": model, "file": ["--device-map", all_cpu],
            "auto": ["--device-map", "auto", "--max-memory", "cpu=4GiB"], "disk": ["--device-map", disk]}


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in names:
        if name.suffix == ".jsonl":  # perturb's trials: identical but for each trial's wall time
            rows = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
                     for line in (d / name).read_text().splitlines()] for d in (a, b)]
            assert rows[0] == rows[1], name
        elif name.name not in RECORDS:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _runs(setup, command, args, variants, tag):
    out = {}
    for variant in ("none", *variants):
        d = setup["root"] / f"{command}-{tag}-{variant}"
        flags = [] if variant == "none" else setup[variant]
        result = run(command, "--model", setup["model"], *FAST, *args, *flags, "--out-dir", d)
        assert result.exit_code == 0, result.output
        out[variant] = d
    return out


@pytest.mark.slow
def test_baseline_with_a_device_map_equals_the_run_without(setup):
    runs = _runs(setup, "baseline", [], ("file", "auto", "disk"), "b")
    for variant in ("file", "auto", "disk"):
        same_files(runs["none"], runs[variant])
    model = json.loads((runs["disk"] / "experiment_manifest.json").read_text())["model"]
    assert model["device_map"].endswith("disk.json") and model["offloaded"] and model["devices"] == ["cpu", "disk"]
    assert json.loads((runs["auto"] / "config.json").read_text())["model"]["max_memory"] == "cpu=4GiB"


@pytest.mark.slow
@pytest.mark.parametrize("args, tag", [
    (["--metric", "grad_x_weight", "--mode", "per_layer", "--topk", "4"], "gxw-layer"),
    (["--metric", "grad_x_weight", "--mode", "global", "--topk", "20"], "gxw-global"),
    (["--metric", "hutchinson_diag", "--mode", "global", "--topk", "20", "--hutchinson-probes", "2"], "hutch"),
])
def test_profile_with_a_device_map_equals_the_run_without(setup, args, tag):
    runs = _runs(setup, "profile", [*args, "--seeds", "0"], ("file", "auto"), tag)
    same_files(runs["none"], runs["file"])
    same_files(runs["none"], runs["auto"])


@pytest.mark.slow
def test_perturb_with_a_device_map_equals_the_run_without(setup):
    args = ["--metric", "grad_x_weight", "--topk", "3", "--seeds", "0", "--control-sets", "2", "--n-bootstrap", "100"]
    runs = _runs(setup, "perturb", args, ("file", "auto"), "p")
    same_files(runs["none"], runs["file"])
    same_files(runs["none"], runs["auto"])


def test_gradient_metric_with_offloaded_weights_is_refused_in_one_line(setup):
    out = setup["root"] / "refused"
    result = run("profile", "--model", setup["model"], *FAST, "--seeds", "0", *setup["disk"], "--out-dir", out)
    assert result.exit_code == 2
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "needs gradients" in lines[0] and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.slow
def test_magnitude_profile_with_offloaded_weights_equals_the_run_without(setup):
    runs = _runs(setup, "profile", ["--metric", "magnitude", "--topk", "4", "--seeds", "0"], ("disk",), "mag")
    same_files(runs["none"], runs["disk"])


def test_perturbing_disk_offloaded_weights_is_refused(setup):
    out = setup["root"] / "refused-perturb"
    result = run("perturb", "--model", setup["model"], *FAST, "--metric", "magnitude", "--seeds", "0",
                 *setup["disk"], "--out-dir", out)
    assert result.exit_code == 2 and "offloaded to disk" in result.output and not out.exists()


# ----------------------------------------------------------------------------------------------- plan
MIXTRAL = SHARED / "models" / "configs" / "mixtral-8x7b"


@pytest.mark.skipif(not (MIXTRAL / "config.json").exists(), reason="../shared/models/configs absent")
def test_plan_per_device_for_mixtral_on_two_gpus(tmp_path):
    """docs/RUNBOOK.md's own ``esa plan`` line for Mixtral-8x7B on 2×80 GB GPUs fits, and the per-GPU peaks and
    score groups it prints are those the RUNBOOK and the README state; offloading and a one-GPU map are refused."""
    line = next(l for l in (REPO / "docs" / "RUNBOOK.md").read_text().splitlines()
                if l.startswith("esa plan ") and "--device-map" in l)
    result = run(*[MIXTRAL if a == "$M" else a for a in shlex.split(line)[1:]], "--json")
    assert result.exit_code == 0, result.output
    planned = json.loads(result.output)
    split = planned["device_map"]
    assert split["fits"] and split["reason"] is None
    # the top-level figures are the split's (the whole model on one GPU would not fit: "single_device")
    assert planned["fits"] and not planned["single_device"]["fits"]
    assert planned["peak_bytes"] == max(d["peak_bytes"] for name, d in split["devices"].items() if "cuda" in name)
    assert planned["score_groups"] == split["score_groups"] and set(split["devices"]) == {"cuda:0", "cuda:1"}
    printed = "\n".join(split["lines"])
    peaks = dict(re.findall(r"(cuda:\d) +weights .*?peak ≈ ([\d.]+) GiB", printed))
    assert set(peaks) == {"cuda:0", "cuda:1"}, printed
    groups = re.search(r"score groups (\d+)", printed).group(1)
    stated = f"a peak of {float(peaks['cuda:0']):.1f} GiB on GPU 0 and {float(peaks['cuda:1']):.1f} GiB on GPU 1"
    for doc in ("README.md", "docs/RUNBOOK.md"):
        text = " ".join((REPO / doc).read_text().split())
        assert stated in text and f"{groups} score groups" in text, (doc, stated, groups)
    base = ["plan", "--model", MIXTRAL, "--command", "profile", "--max-samples", "64", "--seq-len", "2048"]
    # one GPU with the rest offloaded to CPU: the gradient metric refuses offloaded weights
    result = run(*base, "--device-map", "auto", "--max-memory", "0=75GiB,cpu=200GiB", "--device-memory", "80GB")
    assert result.exit_code == 1 and "offloads weights to cpu" in result.output
    # a FILE.json map puts everything on one 75 GiB GPU: does not fit
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"": 0}))
    result = run(*base, "--device-map", path, "--max-memory", "0=75GiB")
    assert result.exit_code == 1 and "cuda:0 needs" in result.output


# ----------------------------------------------------------------------------------------------- bench script
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_map_check_stops_without_cuda(tmp_path, capsys):
    from bench import device_map_check

    assert device_map_check.main(["--out-dir", str(tmp_path / "out")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_device_map_check_dry_run_on_cpu(tmp_path):
    """The script's CPU path (an all-cpu map): every command runs and the split equals the one-device run."""
    from bench import device_map_check

    assert device_map_check.main(["--cpu", "--out-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["baseline_max_abs_diff"] == 0.0
    assert summary["profile_on_split"]["exit"] == 0  # nothing offloaded: the gradient metric runs
    assert set(summary["perturb_trials"]) >= {"baseline", "super/seed0", "random_k/set0"}
