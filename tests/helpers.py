"""Small models and paths shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES260K = SHARED / "models" / "stories260K"
WIKITEXT2_DIR = SHARED / "data" / "wikitext-2-raw"
TINYSTORIES_VAL = SHARED / "data" / "tinystories-valid-slice" / "tinystories_val.txt"

ARCHS = ("llama", "mistral", "phi3", "gpt_neox", "mixtral")


def small_config(arch: str, vocab_size: int = 256, layers: int = 2):
    """A few-thousand-parameter config of each supported architecture."""
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config

    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(**common, num_key_value_heads=2)
    if arch == "mistral":
        return MistralConfig(**common, num_key_value_heads=2, sliding_window=None)
    if arch == "phi3":
        return Phi3Config(**common, num_key_value_heads=2)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**common)
    if arch == "mixtral":
        return MixtralConfig(**common, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(arch)


def random_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, vocab_size: int = 256,
                 layers: int = 2):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(small_config(arch, vocab_size, layers), dtype=dtype)
    return model.eval()


def save_random_model(arch: str, path: Path, *, seed: int = 0) -> Path:
    """A random-weight model directory with the embedded model's tokenizer (vocab 2048), usable as --model."""
    from transformers import AutoTokenizer

    from esa.tiny import ASSETS_DIR

    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR)
    model = random_model(arch, seed=seed, vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_embedded(dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from esa.tiny import ASSETS_DIR

    model = AutoModelForCausalLM.from_pretrained(ASSETS_DIR, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(ASSETS_DIR)


PLANTED = {"layer": 1, "row": 5, "col": 7}


def planted_super_weight_model(seed: int = 0):
    """A small random Llama whose predictions hinge on one mlp.down_proj element, like a real super weight.

    Four channels of the token embedding are set to a constant, so that MLP unit ``col`` of layer 1 (its gate and
    up rows read only those channels) has a massive, token-independent activation. The single weight
    down_proj[row, col] writes it into residual channel ``row``, which the lm_head reads as a log-unigram prior of
    the embedded corpus. With the weight, PPL drops well below the uniform guess; without it, it returns there.
    The model uses the embedded tokenizer's vocabulary, so it can be saved and used through the CLI.
    Returns (model, {"layer", "row", "col", "flat_index", "tensor"}).
    """
    from transformers import AutoTokenizer

    from esa.corpus import load_corpus
    from esa.tiny import ASSETS_DIR
    from esa.windows import tokenize

    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR)
    vocab = len(tokenizer)
    model = random_model("llama", seed=seed, vocab_size=vocab, layers=3)
    ids = tokenize(tokenizer, load_corpus("embedded").text)
    layer, row, col = PLANTED["layer"], PLANTED["row"], PLANTED["col"]
    constant = [0, 1, 2, 3]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, constant] = 1.0
        mlp = model.model.layers[layer].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[col] = 0.0
            proj.weight[col, constant] = 0.25
        mlp.down_proj.weight[:, col] = 0.0
        mlp.down_proj.weight[row, col] = 0.03
        counts = torch.bincount(ids, minlength=vocab).double() + 1
        log_prior = counts.log() - counts.log().mean()
        model.lm_head.weight[:, row] = (0.1 * log_prior).float()
    cols = mlp.down_proj.weight.shape[1]
    info = dict(PLANTED, flat_index=row * cols + col, tensor=f"model.layers.{layer}.mlp.down_proj.weight")
    return model, info


def save_model(model, path: Path) -> Path:
    from transformers import AutoTokenizer

    from esa.tiny import ASSETS_DIR

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(ASSETS_DIR).save_pretrained(path)
    return path
