"""Every metric against an independent brute-force reference on a tiny float64 model."""

import numpy as np
import pytest
import torch

from esa.errors import EsaError
from esa.modeling import set_attention
from esa.scoring import compute_scores
from esa.tensors import select_tensors
from helpers import random_model

BATCH = 2


@pytest.fixture(scope="module")
def setup():
    model = random_model("llama", dtype=torch.float64, vocab_size=64, layers=2).requires_grad_(False)
    set_attention(model, "eager")
    windows = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(0))
    return model, windows


def batches(windows):
    return [windows[i : i + BATCH] for i in range(0, windows.shape[0], BATCH)]


def loss_of(model, batch):
    return model(input_ids=batch, labels=batch).loss


def per_batch_grads(model, windows, names):
    """Reference: torch.autograd.grad of each batch's mean loss, all tensors at once."""
    params = dict(model.named_parameters())
    out = []
    for batch in batches(windows):
        for n in names:
            params[n].requires_grad_(True)
        gs = torch.autograd.grad(loss_of(model, batch), [params[n] for n in names])
        for n in names:
            params[n].requires_grad_(False)
        out.append(dict(zip(names, gs)))
    return out


def assert_scores_close(actual: torch.Tensor, expected: torch.Tensor, rtol=2e-6):
    """Scores are accumulated in float32 by design: compare to the float64 reference at float32 precision."""
    assert actual.dtype == torch.float32
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale)


def test_first_order_metrics_match_per_batch_autograd(setup):
    model, windows = setup
    tensors = select_tensors(model)
    names = [t.name for t, _ in tensors]
    grads = per_batch_grads(model, windows, names)
    params = dict(model.named_parameters())
    gxw = compute_scores(model, tensors, windows, "grad_x_weight", batch_size=BATCH)
    gsq = compute_scores(model, tensors, windows, "grad_squared", batch_size=BATCH)
    assert gxw.n_batches == gsq.n_batches == 3
    for n in names:
        ref_gxw = sum((g[n] * params[n]).abs() for g in grads) / len(grads)
        ref_gsq = sum(g[n] ** 2 for g in grads) / len(grads)
        assert_scores_close(gxw.scores[n], ref_gxw)
        assert_scores_close(gsq.scores[n], ref_gsq)
    # Scoring leaves no gradients and no requires_grad behind.
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_gradients_never_coexist(setup):
    """The fold hook sees one gradient at a time: at most one scored tensor holds .grad when a hook runs."""
    model, windows = setup
    tensors = select_tensors(model)
    params = [p for _, p in tensors]
    alive = []
    import esa.scoring as scoring

    original = scoring.accumulate_

    def spy(op, score, a, b=None, **kw):
        alive.append(sum(p.grad is not None for p in params))
        return original(op, score, a, b, **kw)

    scoring.accumulate_ = spy
    try:
        compute_scores(model, tensors, windows, "grad_squared", batch_size=BATCH)
    finally:
        scoring.accumulate_ = original
    assert alive and max(alive) == 1


def exact_hessian_diagonal(model, windows, name):
    """Reference: torch.func.hessian of each batch's loss w.r.t. one tensor; mean of the diagonals."""
    from torch.func import functional_call, hessian

    w0 = dict(model.named_parameters())[name].detach().clone()

    def diag_for(batch):
        def f(w):
            return functional_call(model, {name: w}, kwargs={"input_ids": batch, "labels": batch}).loss

        h = hessian(f)(w0)
        n = w0.numel()
        return h.reshape(n, n).diagonal().reshape(w0.shape)

    return sum(diag_for(b) for b in batches(windows)) / len(batches(windows))


def test_hessian_diag_matches_torch_func_hessian(setup):
    model, windows = setup
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors = select_tensors(model, include=[name])
    scores = compute_scores(model, tensors, windows, "hessian_diag", batch_size=BATCH, hessian_budget=10_000)
    assert_scores_close(scores.scores[name], exact_hessian_diagonal(model, windows, name).abs(), rtol=1e-5)


def test_hessian_diag_refuses_beyond_budget(setup):
    model, windows = setup
    with pytest.raises(EsaError, match="exceed --hessian-budget"):
        compute_scores(model, select_tensors(model), windows, "hessian_diag", hessian_budget=100)


def test_hutchinson_converges_to_exact_diagonal_as_one_over_sqrt_m(setup):
    model, windows = setup
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors = select_tensors(model, include=[name])
    exact = exact_hessian_diagonal(model, windows, name)
    probes = [2, 8, 32]  # every probe is a forward-over-reverse pass: 42 per batch and seed
    errors = []
    for m in probes:
        runs = []
        for seed in range(3):  # average over seeds to steady the estimate of the error
            est = compute_scores(model, tensors, windows, "hutchinson_diag", batch_size=BATCH, hutchinson_probes=m,
                                 seed=seed).scores[name].double()
            runs.append(((est - exact.abs()).norm() / exact.norm()).item())
        errors.append(float(np.mean(runs)))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    slope = np.polyfit(np.log(probes), np.log(errors), 1)[0]
    assert -0.8 < slope < -0.3, (slope, errors)  # error ∝ m^-1/2


def test_hutchinson_is_reproducible_per_seed(setup):
    model, windows = setup
    tensors = select_tensors(model, include=["*layers.0.mlp.up_proj*"])
    a = compute_scores(model, tensors, windows, "hutchinson_diag", batch_size=BATCH, hutchinson_probes=2, seed=5)
    b = compute_scores(model, tensors, windows, "hutchinson_diag", batch_size=BATCH, hutchinson_probes=2, seed=5)
    c = compute_scores(model, tensors, windows, "hutchinson_diag", batch_size=BATCH, hutchinson_probes=2, seed=6)
    name = tensors[0][0].name
    assert torch.equal(a.scores[name], b.scores[name]) and not torch.equal(a.scores[name], c.scores[name])


def test_act_mag_matches_activation_norms_collected_by_hand(setup):
    model, windows = setup
    tensors = select_tensors(model)
    scores = compute_scores(model, tensors, windows, "act_mag", batch_size=BATCH)
    # By hand: capture every Linear input over the whole evaluation in one big batch, in float64.
    captured = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(
                lambda m, i, o, name=name: captured.setdefault(name, []).append(i[0].detach().reshape(-1, i[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=windows)
    for h in hooks:
        h.remove()
    params = dict(model.named_parameters())
    for name, xs in captured.items():
        x = torch.cat(xs)
        ref = params[name + ".weight"].abs() * x.pow(2).sum(0).sqrt()[None, :]
        assert_scores_close(scores.scores[name + ".weight"], ref)
    counts = torch.bincount(windows.reshape(-1), minlength=64).double()
    ref_embed = params["model.embed_tokens.weight"].abs() * counts.sqrt()[:, None]
    assert_scores_close(scores.scores["model.embed_tokens.weight"], ref_embed)


def test_act_mag_skips_tensors_it_cannot_define(setup):
    model, windows = setup
    tensors = select_tensors(model, include=["*norm*", "*q_proj*"], norms=True)
    scores = compute_scores(model, tensors, windows, "act_mag", batch_size=BATCH)
    assert all("norm" not in n for n in scores.scores) and len(scores.meta["skipped"]) == 5


def test_magnitude_is_abs_weight(setup):
    model, _ = setup
    tensors = select_tensors(model)
    scores = compute_scores(model, tensors, None, "magnitude")
    for info, p in tensors:
        assert torch.equal(scores.scores[info.name], p.detach().abs().float())


def test_tied_embedding_is_scored_once_with_both_gradients():
    """A tied embedding/lm_head gets one hook call per backward with the summed gradient."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).double().eval()
    windows = torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(1))
    tensors = select_tensors(model, include=["*embed_tokens*"])
    assert tensors[0][0].aliases == ("lm_head.weight",)
    scores = compute_scores(model, tensors, windows, "grad_squared", batch_size=2)
    ref = per_batch_grads(model, windows, ["model.embed_tokens.weight"])
    expected = sum(g["model.embed_tokens.weight"] ** 2 for g in ref) / len(ref)
    assert_scores_close(scores.scores["model.embed_tokens.weight"], expected)


def test_unknown_metric_and_empty_selection(setup):
    model, windows = setup
    with pytest.raises(EsaError, match="unknown --metric"):
        compute_scores(model, select_tensors(model), windows, "fisher_block")
    with pytest.raises(EsaError, match="no tensor"):
        compute_scores(model, [], windows, "grad_squared")


def test_first_order_metrics_weigh_every_batch_equally_with_a_short_last_batch(setup):
    """5 windows, batches of 2, 2 and 1: each batch's mean-loss gradient counts 1/3, as documented."""
    model, windows = setup
    windows = windows[:5]
    tensors = select_tensors(model, include=["*layers.0.mlp.*"])
    names = [t.name for t, _ in tensors]
    grads = per_batch_grads(model, windows, names)
    assert len(grads) == 3
    params = dict(model.named_parameters())
    gxw = compute_scores(model, tensors, windows, "grad_x_weight", batch_size=BATCH)
    gsq = compute_scores(model, tensors, windows, "grad_squared", batch_size=BATCH)
    for n in names:
        assert_scores_close(gxw.scores[n], sum((g[n] * params[n]).abs() for g in grads) / 3)
        assert_scores_close(gsq.scores[n], sum(g[n] ** 2 for g in grads) / 3)


def test_hutchinson_equals_its_formula_with_the_same_probes(setup):
    """Exact check, not only convergence: with the probes esa draws, |(1/(B·m)) Σ_b Σ_i z_i ⊙ H_b z_i| over two
    tensors at once (so the cross-tensor Hessian blocks enter H z), uneven batches, from torch.func.hessian."""
    from torch.func import functional_call, hessian

    from esa.scoring import rademacher_like

    model, windows = setup
    windows = windows[:5]
    names = ["model.layers.1.self_attn.k_proj.weight", "model.layers.1.post_attention_layernorm.weight"]
    tensors = select_tensors(model, include=names, norms=True)
    assert [t.name for t, _ in tensors] == names
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    w0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    probes, seed = 3, 7

    def loss_at(vec, batch):
        parts = {n: v.reshape(s) for n, v, s in zip(names, vec.split(sizes), shapes)}
        return functional_call(model, parts, kwargs={"input_ids": batch, "labels": batch}).loss

    total = torch.zeros_like(w0)
    bs = batches(windows)
    for b, batch in enumerate(bs):
        h = hessian(lambda v: loss_at(v, batch))(w0)
        for i in range(probes):
            z = torch.cat([rademacher_like(params[n], seed, n, b, i).reshape(-1) for n in names])
            total += z * (h @ z)
    expected = (total / (len(bs) * probes)).abs().split(sizes)
    scores = compute_scores(model, tensors, windows, "hutchinson_diag", batch_size=BATCH, hutchinson_probes=probes,
                            seed=seed)
    for n, e, s in zip(names, expected, shapes):
        assert_scores_close(scores.scores[n], e.reshape(s), rtol=1e-5)


# ----------------------------------------------------------------------------------------------- taylor and obd
def mean_loss_gradient(model, windows, names):
    """Reference: the gradient of the mean NLL over ALL windows, from one forward pass over all of them."""
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    gs = torch.autograd.grad(loss_of(model, windows), [params[n] for n in names])
    for n in names:
        params[n].requires_grad_(False)
    return dict(zip(names, gs))


def test_taylor_is_minus_mean_loss_gradient_times_weight_with_uneven_batches(setup):
    """5 windows in batches of 2, 2, 1: taylor = −∇L̄ ⊙ w with L̄ the mean over all 5 windows (not the mean of
    the three batch means), signed, against one float64 autograd pass over all windows."""
    model, windows = setup
    windows = windows[:5]
    tensors = select_tensors(model)
    names = [t.name for t, _ in tensors]
    grad = mean_loss_gradient(model, windows, names)
    params = dict(model.named_parameters())
    scores = compute_scores(model, tensors, windows, "taylor", batch_size=BATCH)
    assert scores.meta["signed"]
    for n in names:
        assert_scores_close(scores.scores[n], -grad[n] * params[n])
    both_signs = torch.cat([scores.scores[n].reshape(-1) for n in names])
    assert (both_signs > 0).any() and (both_signs < 0).any()
    # The batch means weighted equally would differ: the test can tell the two weightings apart.
    per_batch = per_batch_grads(model, windows, names[:1])
    equal_weights = -sum(g[names[0]] for g in per_batch) / 3 * params[names[0]]
    assert not torch.allclose(scores.scores[names[0]].double(), equal_weights, rtol=1e-3, atol=0)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_taylor_predicts_small_ablations_to_first_order(setup):
    """Zeroing one small weight changes the mean loss by ≈ taylor (exact loss changes, float64)."""
    model, windows = setup
    name = "model.layers.1.mlp.down_proj.weight"
    tensors = select_tensors(model, include=[name])
    scores = compute_scores(model, tensors, windows, "taylor", batch_size=BATCH).scores[name].reshape(-1)
    w = dict(model.named_parameters())[name]
    with torch.no_grad():
        base = loss_of(model, windows).item()
        for i in scores.abs().argsort(descending=True)[:5].tolist():
            old = w.view(-1)[i].item()
            w.view(-1)[i] = 0.0
            delta = loss_of(model, windows).item() - base
            w.view(-1)[i] = old
            assert delta == pytest.approx(scores[i].item(), rel=0.05, abs=1e-7)


def test_obd_equals_its_formula_with_the_same_probes(setup):
    """obd = −Ḡ⊙w + ½ Ĥ_ii w², Ĥ = Σ_b (n_b/N)(1/m) Σ_i z ⊙ H_b z with esa's probes; two tensors, uneven batches,
    Hessians from torch.func.hessian in float64."""
    from torch.func import functional_call, hessian

    from esa.scoring import rademacher_like

    model, windows = setup
    windows = windows[:5]
    names = ["model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    tensors = select_tensors(model, include=names)
    names = [t.name for t, _ in tensors]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    w0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    probes, seed = 2, 3

    def loss_at(vec, batch):
        parts = {n: v.reshape(s) for n, v, s in zip(names, vec.split(sizes), shapes)}
        return functional_call(model, parts, kwargs={"input_ids": batch, "labels": batch}).loss

    hdiag = torch.zeros_like(w0)
    bs = batches(windows)
    for b, batch in enumerate(bs):
        h = hessian(lambda v: loss_at(v, batch))(w0)
        for i in range(probes):
            z = torch.cat([rademacher_like(params[n], seed, n, b, i).reshape(-1) for n in names])
            hdiag += batch.shape[0] / windows.shape[0] * z * (h @ z) / probes
    grad = mean_loss_gradient(model, windows, names)
    g = torch.cat([grad[n].reshape(-1) for n in names])
    expected = (-g * w0 + 0.5 * hdiag * w0 * w0).split(sizes)
    scores = compute_scores(model, tensors, windows, "obd", batch_size=BATCH, hutchinson_probes=probes, seed=seed)
    assert scores.meta["probes"] == probes and scores.meta["signed"]
    for n, e, s in zip(names, expected, shapes):
        assert_scores_close(scores.scores[n], e.reshape(s), rtol=1e-5)


def test_signed_metrics_are_selected_by_absolute_value_and_keep_their_sign():
    from esa.scoring import ScoreSet
    from esa.selection import select_extreme
    from esa.tensors import TensorInfo

    a = TensorInfo("a.weight", (2, 3), 0, "mlp.down", "weight")
    b = TensorInfo("b.weight", (4,), 1, "mlp.down", "weight")
    s = ScoreSet("taylor", [a, b], {"a.weight": torch.tensor([[0.1, -5.0, 0.2], [3.0, -0.01, 0.0]]),
                                    "b.weight": torch.tensor([-4.0, 1.0, 0.5, -0.3])}, 1)
    top = select_extreme(s, 3, "global")
    assert list(zip(top.tensor, top.flat_index.tolist(), top.score.tolist())) == [
        ("a.weight", 1, -5.0), ("b.weight", 0, -4.0), ("a.weight", 3, 3.0)]
    per = select_extreme(s, 1, "per_layer", largest=False)
    assert per.score.tolist() == [0.0, pytest.approx(-0.3)]
    assert select_extreme(ScoreSet("grad_x_weight", s.tensors, s.scores, 1), 1, "global").score.tolist() == [3.0]


@pytest.mark.parametrize("metric", ["grad_x_weight", "grad_squared", "hutchinson_diag", "act_mag", "magnitude",
                                    "taylor", "obd", "hessian_diag"])
def test_score_groups_give_bit_identical_scores(setup, metric):
    """Scoring in groups (one pass per group over the same windows) equals scoring all tensors at once, bit for bit;
    for hutchinson_diag because the probe spans every scored tensor in every pass."""
    model, windows = setup
    include = ["*layers.1.self_attn.k_proj*", "*layers.1.post_attention_layernorm*"] if metric == "hessian_diag" else []
    tensors = select_tensors(model, include=include, norms=metric == "hessian_diag")
    names = [t.name for t, _ in tensors]
    kwargs = dict(batch_size=BATCH, hutchinson_probes=2, seed=3, hessian_budget=10_000)
    whole = compute_scores(model, tensors, windows[:5], metric, **kwargs)
    groups = [names[::2], names[1::2]]
    seen = set()
    for group in groups:
        part = compute_scores(model, tensors, windows[:5], metric, group=group, **kwargs)
        assert set(part.scores) <= set(group)
        for name, s in part.scores.items():
            assert torch.equal(s, whole.scores[name]), name
            seen.add(name)
    assert seen == set(whole.scores)
    if metric in ("hutchinson_diag", "obd"):  # a group scored alone (its probe spanning only itself) differs
        alone = compute_scores(model, [t for t in tensors if t[0].name in groups[0]], windows[:5], metric, **kwargs)
        assert not torch.equal(alone.scores[groups[0][0]], whole.scores[groups[0][0]])
