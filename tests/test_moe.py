"""Mixture of experts all the way: a tiny random Mixtral (fused 3-D expert stacks, transformers 5) through naming,
act_mag and grad_x_weight against brute-force float64 references, bit-exact perturbation inside one expert,
experts.csv, and every metric and perturbation through the CLI."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from esa.cli.main import app
from esa.experts import EXPERTS_HEADER, expert_rows
from esa.perturbation import PerturbSpec, perturbed
from esa.scoring import METRICS, compute_scores
from esa.selection import WeightSet
from esa.tensors import TensorInfo, describe_parameters, select_tensors
from helpers import SHARED, save_model

EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 4, 2, 64, 128
FAST = ["--seq-len", "32", "--max-samples", "4", "--batch-size", "4"]
MLP = ["--include", "*mlp.*"]  # routers and expert stacks: the tensors under test, and quick tail statistics
runner = CliRunner()


def tiny_mixtral(vocab_size: int = 512, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Mixtral-8x7B's configuration (/work/shared/models/configs/mixtral-8x7b) scaled down, with random weights:
    hidden 64, intermediate 128, 2 layers, 4 experts, 2 per token. Built in code so that the tests never skip.
    float64 models use the eager experts loop (torch's grouped_mm, the default, takes no float64)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                           num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, max_position_embeddings=256,
                           rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False,
                           hidden_act="silu", bos_token_id=1, eos_token_id=2)
    if dtype == torch.float64:
        config._experts_implementation = "eager"
    torch.manual_seed(seed)
    return MixtralForCausalLM(config).to(dtype).eval()


MIXTRAL_8X7B = SHARED / "models" / "configs" / "mixtral-8x7b"
SIZES = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "num_local_experts", "max_position_embeddings"}


@pytest.mark.skipif(not (MIXTRAL_8X7B / "config.json").exists(), reason="../shared/models/configs absent")
def test_the_tiny_mixtral_is_mixtral_8x7b_scaled_down():
    """Every setting of Mixtral-8x7B's configuration but its sizes is the tiny model's (routing top-2, SiLU, RoPE
    base, RMSNorm eps, untied head, no sliding window), and it keeps 4 query heads per key/value head."""
    from transformers import AutoConfig

    real = AutoConfig.from_pretrained(MIXTRAL_8X7B)
    tiny = tiny_mixtral().config
    a, b = real.to_dict(), tiny.to_dict()
    differ = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert differ <= SIZES | {"_name_or_path", "architectures", "dtype"}, {k: (a.get(k), b.get(k)) for k in differ}
    assert real.num_attention_heads // real.num_key_value_heads == tiny.num_attention_heads // tiny.num_key_value_heads


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ids(n: int, length: int, vocab: int = 512, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_fused_expert_tensors_router_and_coordinates():
    info = {i.name: i for i, _ in describe_parameters(tiny_mixtral())}
    gate_up, down = info["model.layers.1.mlp.experts.gate_up_proj"], info["model.layers.1.mlp.experts.down_proj"]
    assert (gate_up.component, gate_up.shape) == ("moe.gate_up", (EXPERTS, 2 * INTERMEDIATE, HIDDEN))
    assert (down.component, down.shape) == ("moe.down", (EXPERTS, HIDDEN, INTERMEDIATE))
    assert gate_up.is_expert_stack and down.is_expert_stack and down.layer == 1
    router = info["model.layers.1.mlp.gate.weight"]
    assert (router.component, router.shape, router.is_expert_stack) == ("moe.router", (EXPERTS, HIDDEN), False)
    flat = torch.tensor([(3 * HIDDEN + 5) * INTERMEDIATE + 7])
    c = down.coordinates(flat)
    assert (c["expert"].item(), c["row"].item(), c["col"].item()) == (3, 5, 7)


# ----------------------------------------------------------------------------------------------- brute force
def _moe_inputs(model, batch: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the input of the sparse MoE block for every token [tokens, hidden]."""
    seen: list[torch.Tensor] = []
    handles = [layer.mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, HIDDEN).detach()))
               for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _reference_act_mag(model, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """|w|·‖x‖ with every token routed by hand (softmax of the router logits, top-2) and each expert's inputs
    summed token by token, in float64."""
    sumsq: dict[str, torch.Tensor] = {}
    for b in range(windows.shape[0]):
        for layer, hidden in enumerate(_moe_inputs(model, windows[b : b + 1])):
            mlp = model.model.layers[layer].mlp
            prefix = f"model.layers.{layer}.mlp."
            router = mlp.gate.weight.double()
            gate_up = mlp.experts.gate_up_proj.double()
            acc_r = sumsq.setdefault(prefix + "gate.weight", torch.zeros(HIDDEN, dtype=torch.float64))
            acc_in = sumsq.setdefault(prefix + "experts.gate_up_proj", torch.zeros(EXPERTS, HIDDEN, dtype=torch.float64))
            acc_mid = sumsq.setdefault(prefix + "experts.down_proj",
                                       torch.zeros(EXPERTS, INTERMEDIATE, dtype=torch.float64))
            for x in hidden.double():
                acc_r += x * x
                chosen = torch.softmax(router @ x, dim=0).topk(TOP_K).indices.tolist()
                for e in chosen:
                    acc_in[e] += x * x
                    mid = F.silu(gate_up[e, :INTERMEDIATE] @ x) * (gate_up[e, INTERMEDIATE:] @ x)
                    acc_mid[e] += mid * mid
    params = dict(model.named_parameters())
    out = {}
    for name, acc in sumsq.items():
        w = params[name].detach().double().abs()
        out[name] = w * acc.sqrt().unsqueeze(-2)  # [.., rows, cols] · norm of column j (of expert e for stacks)
    return out


def test_act_mag_on_fused_experts_and_router_matches_token_by_token_reference():
    model = tiny_mixtral(dtype=torch.float64)
    windows = ids(3, 12)
    tensors = select_tensors(model, include=["*mlp.experts.*", "*mlp.gate.weight"])
    assert len(tensors) == 6
    got = compute_scores(model, tensors, windows, "act_mag", batch_size=2)
    assert "skipped" not in got.meta and set(got.scores) == {i.name for i, _ in tensors}
    ref = _reference_act_mag(model, windows)
    for name, expected in ref.items():
        assert torch.allclose(got.scores[name].double(), expected, rtol=1e-5, atol=1e-12), name
    # Each expert's scale comes from its own tokens: an expert that gets fewer tokens has smaller norms, so the
    # columns of two experts differ even where their weights are equal in magnitude.
    down = got.scores["model.layers.0.mlp.experts.down_proj"]
    assert not torch.allclose(down[0] / down[0].max(), down[1] / down[1].max())


def test_grad_x_weight_on_fused_experts_matches_autograd_per_batch():
    model = tiny_mixtral(dtype=torch.float64)
    windows = ids(5, 10, seed=2)
    tensors = select_tensors(model, include=["*layers.1.mlp.experts.gate_up_proj", "*layers.0.mlp.experts.down_proj"])
    got = compute_scores(model, tensors, windows, "grad_x_weight", batch_size=2)
    params = [p for _, p in tensors]
    expected = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    batches = [windows[i : i + 2] for i in range(0, 5, 2)]
    for batch in batches:
        for p in params:
            p.requires_grad_(True)
        logits = model(input_ids=batch, use_cache=False).logits.double()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, params)
        for acc, g, p in zip(expected, grads, params):
            acc += (g * p.detach()).abs()
    for (info, _), acc in zip(tensors, expected):
        assert torch.allclose(got.scores[info.name].double(), acc / len(batches), rtol=1e-5, atol=1e-12), info.name
    assert (got.scores[tensors[0][0].name] > 0).any()


# ----------------------------------------------------------------------------------------------- perturbation
def _flat(e: int, row: int, col: int, shape: tuple[int, ...]) -> int:
    return (e * shape[1] + row) * shape[2] + col


@pytest.mark.parametrize("kind", ["zero", "sign_flip", "gauss_noise", "bit_flip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbing_weights_inside_one_expert_restores_bit_exactly(kind, dtype):
    model = tiny_mixtral(dtype=dtype)
    params = dict(model.named_parameters())
    names = ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"]
    coords = [(2, 3, 5), (2, 0, 0), (2, 7, 63)]
    flat = {n: [_flat(*c, tuple(params[n].shape)) for c in coords] for n in names}
    ws = WeightSet([n for n in names for _ in coords], np.array([i for n in names for i in flat[n]], np.int64),
                   np.ones(2 * len(coords)), np.arange(2 * len(coords)), "explicit")
    before = {n: params[n].detach().clone() for n in names}
    spec = PerturbSpec(kind, scale=0.5 if kind == "gauss_noise" else 1.0)
    with perturbed(params, ws, spec, seed=3) as applied:
        assert applied.n_weights == 6
        for n in names:
            now, was = params[n].detach(), before[n]
            changed = (now.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
                       != was.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
            where = sorted(changed.reshape(-1).nonzero().reshape(-1).tolist())
            assert where == sorted(flat[n]), (kind, n)  # exactly the chosen weights, all in expert 2
            assert torch.equal(now[[0, 1, 3]], was[[0, 1, 3]])
            picked, orig = now.reshape(-1)[flat[n]].float(), was.reshape(-1)[flat[n]].float()
            if kind == "zero":
                assert torch.equal(picked, torch.zeros_like(picked))
            elif kind == "sign_flip":
                assert torch.equal(picked, -orig)
    for n in names:
        assert torch.equal(params[n].detach().view(torch.uint8), before[n].view(torch.uint8)), (kind, n)


# ----------------------------------------------------------------------------------------------- experts.csv
def test_expert_rows_count_and_mass_per_expert():
    stack = TensorInfo("m.layers.0.mlp.experts.down_proj", (3, 2, 2), 0, "moe.down", "weight")
    router = TensorInfo("m.layers.0.mlp.gate.weight", (3, 2), 0, "moe.router", "weight")
    legacy = TensorInfo("m.layers.1.block_sparse_moe.experts.1.w2.weight", (2, 2), 1, "moe.down", "weight", 1)
    top = [stack.name, stack.name, stack.name, router.name, legacy.name]
    flat = np.array([8, 9, 0, 1, 3])  # experts 2, 2, 0 of the stack
    got = expert_rows([stack, router, legacy], top, flat, {stack.name: 10.0, router.name: 6.0, legacy.name: 4.0},
                      {stack.name: [1.0, 2.0, 7.0]})
    assert got == [(0, 0, 1, 0.2, 0.05, 0.1), (0, 1, 0, 0.0, 0.1, 0.2), (0, 2, 2, 0.4, 0.35, 0.7),
                   (1, 1, 1, 0.2, 0.2, 1.0)]
    assert expert_rows([router], [router.name], np.array([0]), {router.name: 1.0}, {}) == []


# ----------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from esa.tiny import ASSETS_DIR

    vocab = len(AutoTokenizer.from_pretrained(ASSETS_DIR))
    return save_model(tiny_mixtral(vocab), tmp_path_factory.mktemp("mixtral") / "model")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A small evaluation text (the embedded corpus is built from installed docstrings: slow to read)."""
    path = tmp_path_factory.mktemp("text") / "text.txt"
    words = ["small", "quick", "sparse", "random", "tiny"]
    path.write_text(" ".join(f"The {words[i % 5]} router sends token {i} to expert {i % 4} in layer {i % 2}."
                             for i in range(60)))
    return ["--text-file", str(path)]


METRIC_ARGS = {
    "grad_x_weight": MLP, "grad_squared": MLP, "magnitude": MLP, "act_mag": MLP, "taylor": MLP,
    "hessian_diag": ["--include", "*layers.1.mlp.gate.weight", "--hessian-budget", "256"],
    "hutchinson_diag": [*MLP, "--hutchinson-probes", "1"],
    "obd": [*MLP, "--hutchinson-probes", "1"],
}


def _finite(values) -> bool:
    return all(math.isfinite(float(v)) for v in values)


@pytest.fixture(scope="module")
def profiles(mixtral_dir, text, tmp_path_factory):
    assert set(METRIC_ARGS) == set(METRICS)
    root = tmp_path_factory.mktemp("profiles")
    results = {}
    for metric, extra in METRIC_ARGS.items():
        result = runner.invoke(app, ["profile", "--model", str(mixtral_dir), "--metric", metric, "--topk", "20",
                                     "--mode", "global", *FAST, *text, *extra, "--out-dir", str(root / metric)])
        results[metric] = (result, root / metric)
    return results


@pytest.mark.parametrize("metric", list(METRIC_ARGS))
def test_every_metric_profiles_the_tiny_mixtral(profiles, metric):
    result, out = profiles[metric]
    assert result.exit_code == 0, result.output
    top = rows(out / "top_weights.csv")
    assert len(top) == 20 and _finite(r["score"] for r in top) and _finite(r["weight"] for r in top)
    assert _finite(float(r["max"]) for r in rows(out / "tensor_stats.csv"))
    for r in top:  # a weight of a fused stack names its expert, and only those do
        assert (r["expert"] != "") == (r["component"] in ("moe.gate_up", "moe.down")), r
        if r["expert"]:
            assert 0 <= int(r["expert"]) < EXPERTS
    if metric == "hessian_diag":  # only the router is scored: no expert, no experts.csv
        assert not (out / "experts.csv").exists() and {r["component"] for r in top} == {"moe.router"}
        return
    table = rows(out / "experts.csv")
    assert list(table[0]) == list(EXPERTS_HEADER)
    assert {(int(r["layer"]), int(r["expert"])) for r in table} == {(l, e) for l in range(2) for e in range(EXPERTS)}
    in_experts = sum(r["expert"] != "" for r in top)
    assert sum(int(r["topk_count"]) for r in table) == in_experts
    assert sum(float(r["topk_share"]) for r in table) == pytest.approx(in_experts / 20)
    for layer in range(2):
        shares = [float(r["layer_mass_share"]) for r in table if int(r["layer"]) == layer]
        assert sum(shares) == pytest.approx(1.0) and all(0 <= s <= 1 for s in shares)
    mass = sum(float(r["score_mass_share"]) for r in table)
    assert 0 < mass < 1  # the experts hold part of the model's score mass, the rest is elsewhere


@pytest.mark.parametrize("kind,extra", [("zero", []), ("sign_flip", []), ("gauss_noise", ["--perturb-scale", "0.5"]),
                                        ("bit_flip", ["--bits", "mantissa"])])
def test_every_perturbation_runs_on_the_tiny_mixtral_with_controls(profiles, mixtral_dir, text, tmp_path, kind, extra):
    _, profile = profiles["grad_x_weight"]
    result = runner.invoke(app, ["perturb", "--model", str(mixtral_dir), *FAST, *text, "--from-profile", str(profile),
                                 "--perturb", kind, *extra, "--seeds", "0", "--control-sets", "2",
                                 "--n-bootstrap", "100", "--out-dir", str(tmp_path / kind)])
    assert result.exit_code == 0, result.output
    from esa.runio import read_json

    conditions = read_json(tmp_path / kind / "results.json")["conditions"]
    assert {"super", "random_k", "bottom_k"} <= set(conditions), conditions.keys()
    for name, c in conditions.items():
        assert c["n_weights"] == 20 and math.isfinite(c["ppl"]), (name, c)
    assert conditions["super"]["delta_ppl"] != 0


def test_report_has_a_per_expert_section(profiles, tmp_path):
    from esa.reporting.build import write_report
    from esa.runio import read_json

    runs = [profiles[m][1] for m in ("grad_x_weight", "hessian_diag")]
    summary = write_report(runs, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.count("Experts holding the most top-k weights") == 1  # not for the run that scored only a router
    for run in runs[:1]:
        key = run.name
        assert {f"figures/experts_count_{key}.png", f"figures/experts_mass_{key}.png"} <= set(summary["figures"])
        table = rows(run / "experts.csv")
        best = max(table, key=lambda r: (int(r["topk_count"]), float(r["layer_mass_share"])))
        even = f"| {best['layer']} | {best['expert']} | {best['topk_count']} |"
        assert even in md, even  # the table's first row is the expert with the most top-k weights
    assert "| expert |" in md  # the top-weights tables name the expert of a fused stack's weight
    top1 = read_json(runs[0] / "metrics.json")["top1"]
    first = rows(runs[0] / "top_weights.csv")[0]
    assert top1["expert"] == (int(first["expert"]) if first["expert"] else None)


def test_perturb_weights_inside_one_expert_from_a_coordinates_file(mixtral_dir, text, tmp_path):
    name = "model.layers.0.mlp.experts.down_proj"
    weights = tmp_path / "one_expert.csv"
    weights.write_text(f"tensor,expert,row,col\n{name},2,3,5\n{name},2,60,127\n")
    result = runner.invoke(app, ["perturb", "--model", str(mixtral_dir), *FAST, *text, "--weights", str(weights),
                                 "--perturb", "sign_flip", "--controls", "random_k", "--control-sets", "2",
                                 "--seeds", "0", "--n-bootstrap", "100", "--out-dir", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    chosen = rows(tmp_path / "p" / "sets" / "super_seed0.csv")
    assert [int(r["flat_index"]) for r in chosen] == [_flat(2, 3, 5, (EXPERTS, HIDDEN, INTERMEDIATE)),
                                                      _flat(2, 60, 127, (EXPERTS, HIDDEN, INTERMEDIATE))]
    assert [(r["expert"], r["row"], r["col"]) for r in chosen] == [("2", "3", "5"), ("2", "60", "127")]


def test_act_mag_of_an_expert_stack_does_not_depend_on_the_score_group():
    model = tiny_mixtral()
    windows = ids(2, 12)
    tensors = select_tensors(model, include=["*layers.1.mlp.*"])
    whole = compute_scores(model, tensors, windows, "act_mag", batch_size=2)
    for group in (["model.layers.1.mlp.experts.down_proj"], ["model.layers.1.mlp.experts.gate_up_proj"]):
        part = compute_scores(model, tensors, windows, "act_mag", batch_size=2, group=group)
        assert torch.equal(part.scores[group[0]], whole.scores[group[0]]) and set(part.scores) == set(group)


def test_only_mixtrals_fused_layout_is_read_as_routed_experts():
    from esa.experts import is_fused_experts

    experts = tiny_mixtral().model.layers[0].mlp.experts
    assert is_fused_experts(experts)
    transposed = torch.nn.Module()  # GPT-OSS-like: gate_up_proj [E, H, 2I], down_proj [E, I, H]
    transposed.gate_up_proj = torch.nn.Parameter(torch.zeros(EXPERTS, HIDDEN, 2 * INTERMEDIATE))
    transposed.down_proj = torch.nn.Parameter(torch.zeros(EXPERTS, INTERMEDIATE, HIDDEN))
    transposed.act_fn = torch.nn.SiLU()
    assert not is_fused_experts(transposed)
