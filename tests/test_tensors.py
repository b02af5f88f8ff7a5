"""Tensor naming (layer, component, expert) across architectures, and the tensor filters."""

import pytest
import torch

from esa.tensors import classify, describe_parameters, select_tensors
from helpers import random_model

EXPECTED = {
    "llama": {
        "model.embed_tokens.weight": (None, "embed"),
        "model.layers.1.self_attn.q_proj.weight": (1, "attn.q"),
        "model.layers.1.self_attn.k_proj.weight": (1, "attn.k"),
        "model.layers.1.self_attn.v_proj.weight": (1, "attn.v"),
        "model.layers.1.self_attn.o_proj.weight": (1, "attn.o"),
        "model.layers.0.mlp.gate_proj.weight": (0, "mlp.gate"),
        "model.layers.0.mlp.up_proj.weight": (0, "mlp.up"),
        "model.layers.0.mlp.down_proj.weight": (0, "mlp.down"),
        "model.layers.0.input_layernorm.weight": (0, "norm.input"),
        "model.norm.weight": (None, "norm.final"),
        "lm_head.weight": (None, "lm_head"),
    },
    "phi3": {
        "model.layers.1.self_attn.qkv_proj.weight": (1, "attn.qkv"),
        "model.layers.1.self_attn.o_proj.weight": (1, "attn.o"),
        "model.layers.0.mlp.gate_up_proj.weight": (0, "mlp.gate_up"),
        "model.layers.0.mlp.down_proj.weight": (0, "mlp.down"),
    },
    "gpt_neox": {
        "gpt_neox.embed_in.weight": (None, "embed"),
        "gpt_neox.layers.1.attention.query_key_value.weight": (1, "attn.qkv"),
        "gpt_neox.layers.1.attention.dense.weight": (1, "attn.o"),
        "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": (0, "mlp.up"),
        "gpt_neox.layers.0.mlp.dense_4h_to_h.weight": (0, "mlp.down"),
        "gpt_neox.layers.0.post_attention_layernorm.weight": (0, "norm.post_attn"),
        "gpt_neox.final_layer_norm.weight": (None, "norm.final"),
        "lm_head.weight": (None, "lm_head"),
    },
    "mixtral": {
        "model.layers.1.mlp.gate.weight": (1, "moe.router"),
        "model.layers.1.mlp.experts.gate_up_proj": (1, "moe.gate_up"),
        "model.layers.1.mlp.experts.down_proj": (1, "moe.down"),
        "model.layers.0.self_attn.k_proj.weight": (0, "attn.k"),
    },
    "mistral": {
        "model.layers.1.mlp.down_proj.weight": (1, "mlp.down"),
        "model.layers.0.self_attn.v_proj.weight": (0, "attn.v"),
    },
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_components_of_each_architecture(arch):
    model = random_model(arch)
    infos = {info.name: info for info, _ in describe_parameters(model)}
    for name, (layer, component) in EXPECTED[arch].items():
        assert (infos[name].layer, infos[name].component) == (layer, component), name
    # Nothing that is a weight matrix is left unnamed.
    assert not [n for n, i in infos.items() if i.kind == "weight" and i.component == "other"]


def test_mixtral_experts_have_expert_coordinates():
    model = random_model("mixtral")
    info = {i.name: i for i, _ in describe_parameters(model)}["model.layers.0.mlp.experts.down_proj"]
    assert info.is_expert_stack and info.shape == (4, 32, 48)
    c = info.coordinates(torch.tensor([3 * 32 * 48 + 2 * 48 + 5]))
    assert (c["expert"].item(), c["row"].item(), c["col"].item()) == (3, 2, 5)


def test_legacy_mixtral_names_carry_the_expert_index():
    assert classify("model.layers.3.block_sparse_moe.experts.6.w1.weight")[1:] == ("moe.gate", "weight", 6)
    assert classify("model.layers.3.block_sparse_moe.experts.6.w2.weight")[1] == "moe.down"
    assert classify("model.layers.3.block_sparse_moe.gate.weight")[1] == "moe.router"


def test_biases_and_norms_are_opt_in():
    model = random_model("gpt_neox")
    default = {i.name for i, _ in select_tensors(model)}
    assert default and all(n.endswith(".weight") and "norm" not in n for n in default)
    with_biases = {i.name for i, _ in select_tensors(model, biases=True)}
    assert any(n.endswith(".bias") for n in with_biases) and not any("layernorm.weight" in n for n in with_biases)
    with_norms = {i.name for i, _ in select_tensors(model, norms=True)}
    assert any("layernorm.weight" in n for n in with_norms)


def test_include_and_exclude_globs():
    model = random_model("llama")
    chosen = [i.name for i, _ in select_tensors(model, include=["*mlp.*"], exclude=["*layers.0.*"])]
    assert chosen == ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
                      "model.layers.1.mlp.down_proj.weight"]
    assert select_tensors(model, include=["nothing*"]) == []


def test_tied_weights_are_listed_once_with_their_alias():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    infos = [i for i, _ in describe_parameters(LlamaForCausalLM(cfg))]
    embed = [i for i in infos if i.component == "embed"]
    assert len(embed) == 1 and embed[0].aliases == ("lm_head.weight",)
    assert not [i for i in infos if i.name == "lm_head.weight"]
    # An include pattern on the alias selects the tied tensor.
    assert [i.name for i, _ in select_tensors(LlamaForCausalLM(cfg), include=["lm_head*"])] == [
        "model.embed_tokens.weight"]
