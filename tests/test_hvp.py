"""Forward-over-reverse Hessian-vector products (esa.hvp) against double backward, in float64.

The reference here is the double-backward H z that esa used before (g = ∇L with its graph, then ∇(g·z)); it is
kept in this file only. Attention runs on SDPA's math kernel in both (eager attention's float32 softmax would
limit agreement to ~1e-9 in a float64 model), and the loss is esa's own (chunked through the head).
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import esa.evaluate
import esa.hvp
from esa.errors import EsaError
from esa.evaluate import mean_loss
from esa.hvp import forward_over_reverse, hvp_pass
from esa.modeling import set_attention
from esa.scoring import compute_scores, rademacher_like
from esa.tensors import select_tensors
from helpers import load_embedded, random_model

BATCH = 2


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).double().eval()


def model_for(kind: str):
    if kind == "embedded":
        return load_embedded(torch.float64)[0].requires_grad_(False)
    if kind == "tied_llama":
        return tied_llama().requires_grad_(False)
    return random_model(kind, dtype=torch.float64, vocab_size=64, layers=2).requires_grad_(False)


def windows_for(model, shape=(2, 12), seed: int = 0) -> torch.Tensor:
    """Token ids that avoid the padding id: nn.Embedding zeroes the gradient of the padding row although the loss
    depends on it, so with that row in the probe, ∂g/∂w is not symmetric and double backward ((∂g/∂w)ᵀ z) and
    forward-over-reverse ((∂g/∂w) z) differ there by design."""
    pad = model.config.pad_token_id
    low = 0 if pad is None else pad + 1
    return torch.randint(low, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def float64_norms(model) -> None:
    """Transformers' RMSNorm computes in float32 whatever the model dtype (``.to(torch.float32)``), which would
    limit a float64 comparison to ~1e-8; the same formula in the model's dtype, x · rsqrt(mean(x²) + ε) · w."""
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            eps = getattr(module, "variance_epsilon", None) or module.eps

            def forward(x, module=module, eps=eps):
                return module.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

            module.forward = forward


def probes_for(params: dict, seed: int = 11) -> dict[str, torch.Tensor]:
    return {n: rademacher_like(p, seed, n, 0, 0) for n, p in params.items()}


def double_backward_hvp(model, batch, params: dict, z: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Reference: g = ∇L with create_graph, then H z = ∇(Σ_t g_t · z_t), on SDPA's math kernel."""
    set_attention(model, "sdpa")
    plist = list(params.values())
    for p in plist:
        p.requires_grad_(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            grads = torch.autograd.grad(mean_loss(model, batch), plist, create_graph=True)
            hz = torch.autograd.grad(sum((g * z[n]).sum() for n, g in zip(params, grads)), plist)
    finally:
        for p in plist:
            p.requires_grad_(False)
    return {n: (g.detach(), h) for n, g, h in zip(params, grads, hz)}


def forward_over_reverse_hvp(model, batch, params: dict, z: dict, wanted=None) -> dict:
    set_attention(model, "sdpa")
    out = {}

    def fold(name, g, hz):  # a tied tensor arrives in parts that sum to its gradient
        before = out.get(name, (0, 0))
        out[name] = (before[0] + g, before[1] + hz)

    with forward_over_reverse(model) as sweep:
        hvp_pass(model, sweep, lambda: mean_loss(model, batch), {n: (p, z[n]) for n, p in params.items()},
                 set(params) if wanted is None else set(wanted), fold)
    return out


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-10):
    err = (actual - expected).norm().item()
    assert err <= rel * max(expected.norm().item(), 1e-300), f"relative error {err / expected.norm().item():.2e}"


@pytest.fixture
def several_loss_chunks(monkeypatch):
    """Route the loss through esa's chunked, checkpointed head: 5 tokens per chunk."""
    monkeypatch.setattr(esa.evaluate, "chunk_tokens_for", lambda vocab, budget_bytes=0: 5)


@pytest.mark.parametrize("kind", ["embedded", "llama", "mistral", "phi3", "gpt_neox", "tied_llama"])
def test_forward_over_reverse_hz_equals_double_backward(kind, several_loss_chunks):
    """Every parameter of the model at once (all cross-tensor blocks of H), several loss chunks."""
    model = model_for(kind)
    float64_norms(model)
    batch = windows_for(model)
    params = dict(model.named_parameters())
    z = probes_for(params)
    expected = double_backward_hvp(model, batch, params, z)
    actual = forward_over_reverse_hvp(model, batch, params, z)
    assert set(actual) == set(expected)
    for name in expected:
        assert_rel_close(actual[name][0], expected[name][0])
        assert_rel_close(actual[name][1], expected[name][1])


def test_the_probe_spans_tensors_that_get_no_gradient():
    """H z for one tensor with z spanning two: the cross block enters (it differs from z over one tensor alone)."""
    model = model_for("llama")
    float64_norms(model)
    batch = windows_for(model, seed=1)
    all_params = dict(model.named_parameters())
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    params = {n: all_params[n] for n in names}
    z = probes_for(params)
    expected = double_backward_hvp(model, batch, params, z)
    actual = forward_over_reverse_hvp(model, batch, params, z, wanted=[names[0]])
    assert list(actual) == [names[0]]
    assert_rel_close(actual[names[0]][1], expected[names[0]][1])
    alone = forward_over_reverse_hvp(model, batch, {names[0]: params[names[0]]}, z)
    assert (alone[names[0]][1] - expected[names[0]][1]).abs().max() > 1e-8


def test_the_model_is_restored():
    """After the pass: the same modules, parameters, forward methods and attention as before."""
    model = model_for("llama")
    set_attention(model, "eager")
    before = {n: type(m) for n, m in model.named_modules()}
    params_before = dict(model.named_parameters())
    batch = windows_for(model, (2, 8), seed=2)
    tensors = select_tensors(model, include=["*layers.0.mlp.*"])
    compute_scores(model, tensors, batch, "hutchinson_diag", batch_size=BATCH, hutchinson_probes=1)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(params_before[n] is p and isinstance(p, torch.nn.Parameter) and not p.requires_grad and p.grad is None
               for n, p in model.named_parameters())
    assert all("forward" not in vars(m) for m in model.modules())
    assert model.config._attn_implementation == "eager"


def test_an_op_without_forward_ad_is_a_one_line_error(monkeypatch):
    """Without esa's SiLU, Llama's silu_backward has no forward-AD formula: an EsaError naming it, model restored."""
    monkeypatch.setattr(esa.hvp, "_is_silu", lambda module: False)
    model = model_for("llama")
    batch = windows_for(model, (2, 8), seed=3)
    tensors = select_tensors(model, include=["*layers.0.mlp.*"])
    with pytest.raises(EsaError, match="silu_backward") as info:
        compute_scores(model, tensors, batch, "hutchinson_diag", batch_size=BATCH, hutchinson_probes=1)
    assert "\n" not in str(info.value)
    assert all(isinstance(p, torch.nn.Parameter) for _, p in model.named_parameters())


# --------------------------------------------------- scores: the new path against the old double-backward loop


def old_probe_loop(model, tensors, windows, metric: str, probes: int, seed: int) -> dict[str, torch.Tensor]:
    """esa's former hutchinson_diag / obd: per batch, grads with their graph (eager attention), then per probe
    H z = ∇(g·z); folded exactly as the module docstring of esa.scoring says."""
    set_attention(model, "eager")
    names = [info.name for info, _ in tensors]
    params = {info.name: p for info, p in tensors}
    bs = [windows[i : i + BATCH] for i in range(0, windows.shape[0], BATCH)]
    scores = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        for b, batch in enumerate(bs):
            share = batch.shape[0] / windows.shape[0] if metric == "obd" else 1.0
            grads = torch.autograd.grad(mean_loss(model, batch) * share, list(params.values()), create_graph=True)
            if metric == "obd":
                for n, g in zip(names, grads):
                    scores[n] -= g.detach() * params[n].detach()
            for i in range(probes):
                z = {n: rademacher_like(p, seed, n, b, i) for n, p in params.items()}
                hz = torch.autograd.grad(sum((g * z[n]).sum() for n, g in zip(names, grads)), list(params.values()),
                                         retain_graph=True)
                for n, h in zip(names, hz):
                    w2 = params[n].detach() ** 2 * 0.5 / probes if metric == "obd" else 1.0
                    scores[n] += z[n] * h * w2
    finally:
        for p in params.values():
            p.requires_grad_(False)
    if metric == "hutchinson_diag":
        return {n: (s / (len(bs) * probes)).abs() for n, s in scores.items()}
    return scores


@pytest.mark.parametrize("metric", ["hutchinson_diag", "obd"])
@pytest.mark.parametrize("kind", ["llama", "gpt_neox"])
def test_scores_equal_the_double_backward_loop(metric, kind):
    """Same probes, same folding: the scores agree to float32 accumulation (uneven batches, several tensors)."""
    model = model_for(kind)
    windows = windows_for(model, (5, 12), seed=4)
    include = ["*layers.0.mlp.*", "*layers.1.attention.query_key_value*", "*layers.1.self_attn.k_proj*"]
    tensors = select_tensors(model, include=include)
    assert len(tensors) >= 3
    expected = old_probe_loop(model, tensors, windows, metric, probes=2, seed=9)
    set_attention(model, "sdpa")
    scores = compute_scores(model, tensors, windows, metric, batch_size=BATCH, hutchinson_probes=2, seed=9)
    for info, _ in tensors:
        e = expected[info.name]
        torch.testing.assert_close(scores.scores[info.name].double(), e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_bfloat16_scores_track_the_float64_ones():
    """In bf16 (the dtype of the runbook) the new path follows the float64 scores to bf16 accuracy."""
    model = model_for("llama")
    windows = windows_for(model, (4, 12), seed=5)
    ref = compute_scores(model, select_tensors(model, include=["*layers.0.mlp.*"]), windows, "hutchinson_diag",
                         batch_size=BATCH, hutchinson_probes=2).scores
    low = model.to(torch.bfloat16)
    got = compute_scores(low, select_tensors(low, include=["*layers.0.mlp.*"]), windows, "hutchinson_diag",
                         batch_size=BATCH, hutchinson_probes=2).scores
    for name, r in ref.items():
        assert torch.isfinite(got[name]).all()
        assert (got[name] - r).norm() <= 0.1 * r.norm()

