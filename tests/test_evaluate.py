"""The evaluator against the model's own loss, causal leakage, and the leak guard."""

import math

import numpy as np
import pytest
import torch

from esa.evaluate import EvalResult, evaluate, leak_warnings
from esa.windows import make_windows, tokenize
from helpers import load_embedded, random_model


def model_loss_per_window(model, windows: torch.Tensor) -> np.ndarray:
    """Summed NLL per window from the model's own loss (mean over the L−1 shifted targets)."""
    out = []
    with torch.no_grad():
        for w in windows:
            loss = model(input_ids=w[None], labels=w[None]).loss
            out.append(loss.double().item() * (w.numel() - 1))
    return np.array(out)


def embedded_windows(tokenizer, seq_len=64, n=6):
    from esa.corpus import load_corpus

    ids = tokenize(tokenizer, load_corpus("embedded").text)
    return make_windows(ids, seq_len, max_samples=n, seed=0).input_ids


def test_nll_equals_model_loss_on_embedded_model():
    model, tokenizer = load_embedded()
    windows = embedded_windows(tokenizer)
    result = evaluate(model, windows, batch_size=4)
    np.testing.assert_allclose(result.nll, model_loss_per_window(model, windows), rtol=2e-6)
    assert result.tokens.tolist() == [windows.shape[1] - 1] * windows.shape[0]
    assert result.ppl == pytest.approx(math.exp(result.nll.sum() / result.tokens.sum()), rel=1e-12)


@pytest.mark.parametrize("arch", ["gpt_neox", "phi3"])
def test_nll_equals_model_loss_on_random_model_float64(arch):
    model = random_model(arch, dtype=torch.float64)
    windows = torch.randint(0, 256, (5, 33), generator=torch.Generator().manual_seed(1))
    result = evaluate(model, windows, batch_size=2)
    # Hugging Face computes its loss in float32 even for a float64 model: equal at float32 precision...
    np.testing.assert_allclose(result.nll, model_loss_per_window(model, windows), rtol=1e-6)
    # ...and equal to a float64 log-softmax written out by hand at float64 precision.
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    logp = logits[:, :-1] - torch.logsumexp(logits[:, :-1], dim=-1, keepdim=True)
    by_hand = -logp.gather(-1, windows[:, 1:, None]).squeeze(-1).sum(dim=1)
    np.testing.assert_allclose(result.nll, by_hand.numpy(), rtol=1e-12)
    # Accuracy by hand: argmax of each position's logits against the next token.
    hits = (logits[:, :-1].argmax(-1) == windows[:, 1:]).sum().item()
    assert result.accuracy == pytest.approx(hits / (5 * 32))


def test_batch_size_does_not_change_results():
    model, tokenizer = load_embedded()
    windows = embedded_windows(tokenizer, n=5)
    a = evaluate(model, windows, batch_size=1)
    b = evaluate(model, windows, batch_size=5)
    np.testing.assert_allclose(a.nll, b.nll, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "mixtral"])
def test_changing_token_k_leaves_earlier_logits_unchanged(arch):
    model = random_model(arch)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (1, 40), generator=gen)
    k = 23
    changed = ids.clone()
    changed[0, k] = (ids[0, k] + 7) % 256
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = model(input_ids=changed).logits
    torch.testing.assert_close(a[0, :k], b[0, :k], rtol=0, atol=1e-6)
    assert not torch.allclose(a[0, k:], b[0, k:])  # the change is seen from position k on


def test_embedded_model_is_causal():
    model, _ = load_embedded()
    ids = torch.randint(3, 2000, (1, 100), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 60] = 5
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[0, :60], b[0, :60], rtol=0, atol=1e-6)


class PeekingLM(torch.nn.Module):
    """A deliberately leaky 'model': its logits at t put all mass on input t+1 (it sees the future)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        nxt = torch.roll(input_ids, -1, dims=1)
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float() * 30.0
        return type("Out", (), {"logits": logits})()


def test_leak_guard_fires_on_a_leaky_evaluation():
    windows = torch.randint(0, 100, (4, 50), generator=torch.Generator().manual_seed(0))
    result = evaluate(PeekingLM(100), windows, batch_size=2)
    assert result.ppl < 1.01 and result.accuracy == 1.0
    warnings = leak_warnings(result, windows)
    assert len(warnings) == 2 and "PPL" in warnings[0] and "accuracy" in warnings[1]


def test_leak_guard_quiet_on_honest_evaluation():
    model, tokenizer = load_embedded()
    windows = embedded_windows(tokenizer)
    assert leak_warnings(evaluate(model, windows), windows) == []


def test_leak_guard_flags_duplicate_windows():
    result = EvalResult(nll=np.array([300.0, 300.0]), tokens=np.array([99, 99]), correct=np.array([10, 10]))
    windows = torch.arange(100).repeat(2, 1)
    assert any("duplicates" in w for w in leak_warnings(result, windows))


def test_non_finite_loss_is_reported():
    from esa.errors import EsaError
    from esa.evaluate import require_finite

    model = random_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    result = evaluate(model, torch.randint(0, 256, (2, 16)))
    assert not result.finite
    with pytest.raises(EsaError, match="NaN or infinite"):
        require_finite(result)


# ----------------------------------------------------------------------------------------------- chunked loss
def _chunked_vs_model(model, windows, chunk_tokens):
    """(chunked loss, model's loss, chunked grads, model's grads) for every parameter."""
    from esa.evaluate import window_nll

    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    try:
        sums, _ = window_nll(model, windows, chunk_tokens=chunk_tokens)
        ours = (sums.sum() / (windows.shape[0] * (windows.shape[1] - 1))).float()
        g_ours = torch.autograd.grad(ours, params)
        theirs = model(input_ids=windows, labels=windows, use_cache=False).loss
        g_theirs = torch.autograd.grad(theirs, params)
    finally:
        for p in params:
            p.requires_grad_(False)
    return ours, theirs, g_ours, g_theirs


def _chunk_models():
    from helpers import STORIES260K

    yield "embedded", load_embedded()[0]
    yield "gpt_neox", random_model("gpt_neox")
    tied = random_model("llama")
    tied.lm_head.weight = tied.model.embed_tokens.weight  # tied embeddings: one parameter, two uses
    yield "llama_tied", tied
    if (STORIES260K / "model.safetensors").exists():
        from transformers import AutoModelForCausalLM

        yield "stories260K", AutoModelForCausalLM.from_pretrained(STORIES260K, dtype=torch.float32).eval()


def test_chunked_loss_gradients_and_accuracy_equal_the_models_own():
    from esa.evaluate import loss_path, window_nll

    seen = []
    for name, model in _chunk_models():
        vocab = model.get_output_embeddings().out_features
        windows = torch.randint(3, vocab, (3, 17), generator=torch.Generator().manual_seed(2))
        assert loss_path(model) == "chunked", name
        ours, theirs, g_ours, g_theirs = _chunked_vs_model(model, windows, chunk_tokens=5)  # 48 tokens: 10 chunks
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)
        for a, b in zip(g_ours, g_theirs):  # float32 sums in another order: relative to the tensor's scale
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6 * float(b.abs().max()), msg=name)
        with torch.no_grad():
            _, hits = window_nll(model, windows, with_correct=True, chunk_tokens=7)
            logits = model(input_ids=windows).logits
        assert hits.tolist() == (logits[:, :-1].argmax(-1) == windows[:, 1:]).sum(dim=1).tolist(), name
        seen.append(name)
    assert seen[:3] == ["embedded", "gpt_neox", "llama_tied"]


def test_a_head_with_a_logit_transform_falls_back_to_the_models_logits():
    from esa.evaluate import loss_path

    model = random_model("llama")
    assert loss_path(model) == "chunked"
    model.config.final_logit_softcapping = 30.0  # the chunked path would skip the soft-capping: must not be taken
    assert loss_path(model) == "full_logits"
    windows = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    ours, theirs, g_ours, g_theirs = _chunked_vs_model(model, windows, chunk_tokens=4)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6 * float(b.abs().max()))
