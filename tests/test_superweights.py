"""`esa superweights`: a planted activation spike is found as rank 1 in every supported architecture; the embedded
model has none; the CSV round-trips through `esa perturb --weights`; the registry resolves for `--weights known`."""

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from esa.cli.main import app
from esa.superweight_detection import detect, down_projections, mediation, recording
from helpers import random_model, small_config

runner = CliRunner()
LAYER, ROW, COL = 1, 5, 7
CONSTANT = [0, 1, 2, 3]  # embedding channels set to a constant: every token drives the planted unit
EXTRA_ARCHS = ("qwen2", "olmo", "falcon", "gpt2")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tiny(arch: str, vocab: int = 64):
    """A two-layer random model of ``arch`` (the helpers' set plus Qwen2, OLMo, Falcon and GPT-2)."""
    from transformers import AutoModelForCausalLM, FalconConfig, GPT2Config, OlmoConfig, Qwen2Config

    if arch not in EXTRA_ARCHS:
        return random_model(arch, vocab_size=vocab)
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=64)
    config = {"qwen2": lambda: Qwen2Config(**common, num_key_value_heads=2),
              "olmo": lambda: OlmoConfig(**common, num_key_value_heads=2, pad_token_id=0),
              "falcon": lambda: FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, new_decoder_architecture=False),
              "gpt2": lambda: GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                         n_positions=64)}[arch]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def plant(model, arch: str, layer: int = LAYER, row: int = ROW, col: int = COL, expert: int = 2):
    """A unit that fires on every token (its up/gate rows read only the constant embedding channels) and a large
    down-projection weight from it into residual channel ``row``: input spike at ``col``, output spike at ``row``.
    Returns (tensor name, storage row, storage col, expert)."""
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, CONSTANT] = 5.0
        blocks = model.transformer.h if arch in ("gpt2", "falcon") else (
            model.gpt_neox.layers if arch == "gpt_neox" else model.model.layers)
        block = blocks[layer]
        if arch == "gpt2":
            fc, proj = block.mlp.c_fc.weight, block.mlp.c_proj.weight  # Conv1D: [in, out]
            fc[:, col] = 0.0
            fc[CONSTANT, col] = 10.0
            proj[col, :] = 0.0
            proj[col, row] = 2.0
            return f"transformer.h.{layer}.mlp.c_proj.weight", col, row, None
        if arch == "mixtral":
            moe = block.mlp
            moe.gate.weight[expert, CONSTANT] = 10.0  # the router always picks this expert
            gu, down = moe.experts.gate_up_proj[expert], moe.experts.down_proj[expert]
            inter = down.shape[1]
            for r in (col, inter + col):
                gu[r] = 0.0
                gu[r, CONSTANT] = 10.0
            down[:, col] = 0.0
            down[row, col] = 2.0
            return f"model.layers.{layer}.mlp.experts.down_proj", row, col, expert
        mlp = block.mlp
        if arch == "phi3":
            ups, down, name = [(mlp.gate_up_proj.weight, col), (mlp.gate_up_proj.weight, mlp.down_proj.weight.shape[1]
                                                                 + col)], mlp.down_proj.weight, "down_proj"
        elif arch in ("gpt_neox", "falcon"):
            ups, down, name = [(mlp.dense_h_to_4h.weight, col)], mlp.dense_4h_to_h.weight, "dense_4h_to_h"
        else:
            ups, down, name = [(mlp.gate_proj.weight, col), (mlp.up_proj.weight, col)], mlp.down_proj.weight, "down_proj"
        for w, r in ups:
            w[r] = 0.0
            w[r, CONSTANT] = 10.0
        down[:, col] = 0.0
        down[row, col] = 2.0
        prefix = {"gpt_neox": "gpt_neox.layers", "falcon": "transformer.h"}.get(arch, "model.layers")
        return f"{prefix}.{layer}.mlp.{name}.weight", row, col, None


ALL_ARCHS = ("llama", "mistral", "qwen2", "phi3", "olmo", "gpt_neox", "falcon", "gpt2", "mixtral")


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_planted_spike_is_rank_one_in_every_architecture(arch):
    model = tiny(arch)
    ids = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    assert not detect(model, ids)[0], "a random model has no spike above 50"
    tensor, row, col, expert = plant(model, arch)
    found, layers = detect(model, ids)
    assert found, layers
    top = found[0]
    assert (top.tensor, top.row, top.col, top.expert, top.layer) == (tensor, row, col, expert, LAYER)
    w = dict(model.named_parameters())[tensor]
    assert w.reshape(-1)[top.flat_index] == 2.0 and top.weight == 2.0
    assert top.input_spike > 50 and top.output_spike > 50
    # One row per down projection (per routed expert for Mixtral, whose planted expert serves every token).
    assert len(layers) == 2 if arch != "mixtral" else sum(r[0] == tensor and r[2] == 2 for r in layers) == 1


def test_hooks_are_removed_even_when_the_forward_fails():
    model = tiny("llama")
    projs = down_projections(model)
    with pytest.raises(RuntimeError):
        with recording(projs):
            raise RuntimeError("boom")
    assert all(not p.module._forward_hooks for p in projs)


def test_iterate_finds_the_second_spike_hidden_behind_the_first():
    """Like Phi-3's published trio (one input channel, several rows): unit 7 writes into rows 5 (weight 2) and 11
    (weight 1.5). The first pass sees only the larger output spike; zeroing it reveals the second; the third finds
    nothing new. The model is left bit-exact."""
    model = tiny("llama")
    plant(model, "llama", row=5, col=7)
    with torch.no_grad():
        model.model.layers[LAYER].mlp.down_proj.weight[11, 7] = 1.5
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    once, _ = detect(model, ids)
    assert [(c.row, c.col) for c in once] == [(5, 7)]
    found, _ = detect(model, ids, iterate=True)
    assert [(c.row, c.col, c.iteration) for c in found] == [(5, 7, 0), (11, 7, 1)]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_mediation_restoring_the_super_activation_undoes_the_damage():
    model = tiny("llama")
    plant(model, "llama")
    windows = torch.randint(4, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    found, _ = detect(model, windows[:1])
    assert (found[0].row, found[0].col) == (ROW, COL)
    before = {n: p.clone() for n, p in model.named_parameters()}
    med = mediation(model, found[:1], windows, batch_size=3)
    assert abs(med["mean_nll_zeroed"] - med["mean_nll_intact"]) > 1e-3
    # Restoring the output channel on every token reproduces the intact forward exactly (the weight only writes it).
    assert med["mean_nll_zeroed_activation_restored"] == pytest.approx(med["mean_nll_intact"], abs=1e-6)
    assert med["recovered"] == pytest.approx(1.0, abs=1e-3) and med["n_windows"] == 4
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_embedded_model_has_none_and_says_so(tmp_path):
    out = tmp_path / "sw"
    result = run("superweights", "--out-dir", out)
    assert result.exit_code == 0, result.output
    assert "no super weight" in result.output
    assert rows(out / "superweights.csv") == []
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["found"] == 0 and "no super weight" in metrics["note"] and metrics["layers_scanned"] == 4
    assert (out / "experiment_manifest.json").exists() and (out / "config.json").exists()


def test_csv_round_trips_through_perturb_weights_and_profile_ranks(tmp_path):
    from helpers import save_model

    from esa.tiny import ASSETS_DIR
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(ASSETS_DIR))
    model = tiny("llama", vocab=vocab)
    tensor, row, col, _ = plant(model, "llama")
    model_dir = save_model(model, tmp_path / "m")
    fast = ["--seq-len", "32", "--max-samples", "4", "--batch-size", "4"]
    assert run("profile", "--model", model_dir, "--metric", "magnitude", "--mode", "global", "--topk", "3", *fast,
               "--save-scores", "--out-dir", tmp_path / "prof").exit_code == 0
    result = run("superweights", "--model", model_dir, "--from-profile", tmp_path / "prof", "--mediation", *fast,
                 "--out-dir", tmp_path / "sw")
    assert result.exit_code == 0, result.output
    found = rows(tmp_path / "sw" / "superweights.csv")
    assert (found[0]["rank"], found[0]["tensor"], found[0]["row"], found[0]["col"]) == ("1", tensor, str(row),
                                                                                         str(col))
    metrics = json.loads((tmp_path / "sw" / "metrics.json").read_text())
    # magnitude rank of |w| = 2 among every scored weight: 1 + how many are larger (the planted 5s and 10s).
    from esa.tensors import select_tensors

    larger = sum(int((p.abs() > 2.0).sum()) for _, p in select_tensors(model))
    assert larger > 0 and metrics["profile_ranks"]["ranks"][f"{tensor}:{found[0]['flat_index']}"] == larger + 1
    assert metrics["mediation"]["recovered"] == pytest.approx(1.0, abs=1e-3)
    result = run("perturb", "--model", model_dir, "--weights", tmp_path / "sw" / "superweights.csv", *fast,
                 "--seeds", "0", "--controls", "random_k", "--n-bootstrap", "200", "--out-dir", tmp_path / "p")
    assert result.exit_code == 0, result.output
    chosen = rows(tmp_path / "p" / "sets" / "super_seed0.csv")
    assert [(r["tensor"], r["flat_index"]) for r in chosen] == [(r["tensor"], r["flat_index"]) for r in found]
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    # A random model: the spike is no help to it, but removing it moves PPL far more than a random weight does.
    assert abs(res["conditions"]["super"]["delta_ppl"]) > 100 * abs(res["conditions"]["random_k"]["delta_ppl"])


def test_registry_cites_sources_and_has_valid_coordinates():
    from esa.superweight_registry import REGISTRY, lookup

    assert len(REGISTRY) == 9
    for e in REGISTRY:
        assert "2411.07191" in e.source or "LLMSuperWeight" in e.source
        assert e.coordinates and all(len(c) == 3 and all(isinstance(v, int) and v >= 0 for v in c)
                                     for c in e.coordinates)
        assert len(set(e.coordinates)) == len(e.coordinates)
        assert all(lookup(i) is e for i in e.ids)
    assert lookup("meta-llama/Meta-Llama-3-8B").coordinates == ((1, 788, 2427), (1, 1384, 2427), (1, 4062, 2427))
    assert lookup("/models/Mistral-7B-v0.1").name == "Mistral-7B-v0.1"
    assert lookup("gpt2") is None


def test_weights_known_resolves_by_model_id(tmp_path):
    """A Llama with LLaMA-7B's layer-2 down_proj shape (hidden 4096 × 11008 is too big: the coordinates only need
    row < rows and col < cols, so a narrow model named like the hub id) resolves; an unknown model is refused."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from esa.superweight_registry import known_weight_set
    from esa.tiny import ASSETS_DIR

    cfg = LlamaConfig(vocab_size=16, hidden_size=4096 // 256 * 256, intermediate_size=8, num_hidden_layers=3,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=8)
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg)
    params = {n: p for n, p in meta.named_parameters()}
    from esa.errors import EsaError

    with pytest.raises(EsaError, match="outside"):  # 7003 ≥ 8 intermediate channels
        known_weight_set("huggyllama/llama-7b", params)
    cfg.intermediate_size = 11008
    with torch.device("meta"):
        params = dict(LlamaForCausalLM(cfg).named_parameters())
    ws = known_weight_set("huggyllama/llama-7b", params)
    assert ws.tensor == ["model.layers.2.mlp.down_proj.weight"] and ws.flat_index.tolist() == [3968 * 11008 + 7003]
    with pytest.raises(EsaError, match="no published super weights"):
        known_weight_set("esa-tiny", params)
    result = run("perturb", "--weights", "known", "--seq-len", "32", "--max-samples", "2", "--seeds", "0",
                 "--out-dir", tmp_path / "p")
    assert result.exit_code == 2 and "no published super weights for 'esa-tiny'" in result.output
    assert "Traceback" not in result.output
