"""Perturbations change exactly the selected weights, and every parameter comes back bit-exactly."""

import hashlib

import numpy as np
import pytest
import torch

from esa.errors import EsaError
from esa.evaluate import evaluate
from esa.fingerprint import tensor_fingerprint
from esa.perturbation import PerturbSpec, perturbed, validate_spec
from esa.selection import WeightSet
from helpers import random_model

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SPECS = [PerturbSpec("zero"), PerturbSpec("sign_flip"), PerturbSpec("sign_flip", scale=3.0),
         PerturbSpec("gauss_noise", scale=0.5), PerturbSpec("bit_flip", prob=1.0, bits="any"),
         PerturbSpec("bit_flip", prob=0.5, bits="exponent"), PerturbSpec("bit_flip", prob=1.0, bits="14")]


def param_hashes(model) -> dict[str, str]:
    """Independent of esa: SHA-256 of every parameter's raw bytes."""
    return {n: hashlib.sha256(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, p in model.named_parameters()}


def weight_set(model, per_tensor=5, seed=0) -> WeightSet:
    """A few elements of several tensors, including the first and last element of one of them."""
    g = torch.Generator().manual_seed(seed)
    names, flat = [], []
    for name, p in list(model.named_parameters())[1:6]:
        idx = torch.randperm(p.numel(), generator=g)[:per_tensor].tolist()
        names += [name] * len(idx)
        flat += idx
    last_name, last = list(model.named_parameters())[-1]
    names += [last_name, last_name]
    flat += [0, last.numel() - 1]
    n = len(names)
    return WeightSet(names, np.array(flat), np.zeros(n), np.arange(n))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_kind_restores_bit_exactly(dtype):
    model = random_model("llama", dtype=dtype)
    params = dict(model.named_parameters())
    ws = weight_set(model)
    before = param_hashes(model)
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for spec in SPECS:
        for seed in (0, 1):
            with perturbed(params, ws, spec, seed) as applied:
                changed = param_hashes(model) != before
                evaluate(model, windows)
            assert param_hashes(model) == before, (spec, seed)
            assert applied.n_weights == len(ws)
            if spec.kind != "bit_flip" or spec.prob == 1.0:
                assert changed, spec


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_only_selected_elements_change_and_values_are_right(dtype):
    model = random_model("llama", dtype=dtype)
    params = dict(model.named_parameters())
    ws = weight_set(model)
    originals = {n: p.detach().clone() for n, p in params.items()}
    groups = ws.by_tensor()
    with perturbed(params, ws, PerturbSpec("sign_flip"), 0):
        for name, p in params.items():
            diff = (p.detach().view(-1) != originals[name].view(-1)).nonzero().squeeze(1)
            chosen = groups.get(name, torch.empty(0, dtype=torch.int64))
            assert set(diff.tolist()) <= set(chosen.tolist())
            if name in groups:
                torch.testing.assert_close(p.detach().view(-1)[chosen], -originals[name].view(-1)[chosen], rtol=0, atol=0)
    with perturbed(params, ws, PerturbSpec("zero"), 0):
        for name, idx in groups.items():
            assert (params[name].detach().view(-1)[idx] == 0).all()


def test_exception_inside_a_trial_restores_the_weights():
    model = random_model("llama", dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    before = param_hashes(model)
    for spec in SPECS:
        with pytest.raises(RuntimeError, match="boom"):
            with perturbed(params, weight_set(model), spec, 3):
                raise RuntimeError("boom")
        assert param_hashes(model) == before
    with pytest.raises(KeyboardInterrupt):
        with perturbed(params, weight_set(model), PerturbSpec("gauss_noise", scale=1.0), 0):
            raise KeyboardInterrupt
    assert param_hashes(model) == before


def test_failure_while_applying_rolls_back_what_was_applied():
    model = random_model("llama")
    params = dict(model.named_parameters())
    before = param_hashes(model)
    ws = weight_set(model)
    bad = WeightSet(ws.tensor + ["lm_head.weight"], np.append(ws.flat_index, 10 ** 9), np.zeros(len(ws) + 1),
                    np.arange(len(ws) + 1))
    with pytest.raises(EsaError, match="out of range"):
        with perturbed(params, bad, PerturbSpec("zero"), 0):
            pass
    assert param_hashes(model) == before


def test_same_seed_same_perturbation_different_seed_different():
    model = random_model("llama", dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    ws = weight_set(model)

    def perturbed_values(spec, seed):
        with perturbed(params, ws, spec, seed):
            return {n: params[n].detach().view(-1)[i].clone() for n, i in ws.by_tensor().items()}

    for spec in (PerturbSpec("gauss_noise", scale=0.1), PerturbSpec("bit_flip", prob=0.5)):
        a, b, c = perturbed_values(spec, 7), perturbed_values(spec, 7), perturbed_values(spec, 8)
        assert all(torch.equal(a[n].view(torch.int16), b[n].view(torch.int16)) for n in a)
        assert any(not torch.equal(a[n].view(torch.int16), c[n].view(torch.int16)) for n in a)


def test_bit_flip_counts_flipped_bits():
    model = random_model("llama", dtype=torch.float16)
    params = dict(model.named_parameters())
    ws = weight_set(model, per_tensor=200)
    with perturbed(params, ws, PerturbSpec("bit_flip", prob=1.0), 0) as applied:
        pass
    assert applied.bits_flipped == len(ws)
    with perturbed(params, ws, PerturbSpec("bit_flip", prob=0.25), 0) as applied:
        pass
    assert 0.15 * len(ws) < applied.bits_flipped < 0.35 * len(ws)


def test_spec_validation():
    with pytest.raises(EsaError, match="unknown --perturb"):
        validate_spec(PerturbSpec("scramble"))
    with pytest.raises(EsaError, match="--perturb-prob"):
        validate_spec(PerturbSpec("bit_flip", prob=0.0))
    with pytest.raises(EsaError, match="--bits"):
        validate_spec(PerturbSpec("bit_flip", bits="20"), torch.bfloat16)
    validate_spec(PerturbSpec("bit_flip", bits="20"), torch.float32)


def test_fingerprint_detects_any_single_change():
    t = torch.randn(1000, dtype=torch.bfloat16)
    fp = tensor_fingerprint(t)
    for i in (0, 1, 500, 999):
        u = t.clone()
        u.view(torch.int16)[i] ^= 1  # one mantissa bit
        assert tensor_fingerprint(u) != fp
    assert tensor_fingerprint(t.clone()) == fp
    assert tensor_fingerprint(t.float()) != fp
