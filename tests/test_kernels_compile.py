"""Every Triton kernel of esa.kernels compiles ahead of time for sm_80 and sm_90, as a real launch would, no GPU needed.

``bench.kernel_compile`` records every kernel launch that esa's launchers make (under the interpreter), turns each
into the signature, constexprs and divisibility attributes of a real launch with Triton's own launch-time
specialization, and compiles it with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``; ptxas
(shipped in the triton wheel) then reports registers and spills. The report is built once per test session (and
Triton's on-disk cache makes later sessions fast).
"""

from __future__ import annotations

import importlib
import itertools
import os

import pytest

from esa.kernels.dispatch import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

CCS = (80, 90)


def _cannot_compile_here() -> str | None:
    """Why this machine cannot compile for NVIDIA targets, or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        return f"this triton build has no NVIDIA backend ({e})"
    for cc in CCS:
        path = get_ptxas(cc).path
        if not os.access(path, os.X_OK):
            return f"ptxas for sm_{cc} is not executable here: {path}"
    return None


@pytest.fixture(scope="session")
def report() -> dict:
    reason = _cannot_compile_here()
    if reason:
        pytest.skip(reason)
    from bench import kernel_compile

    return kernel_compile.run(CCS)


def _variants(report: dict, kernel: str, tag: str | None = None) -> list[dict]:
    return [v for v in report["variants"] if v["kernel"].endswith("." + kernel) and (tag is None or v["tag"] == tag)]


def test_every_kernel_is_launched_and_compiled_for_every_target(report: dict) -> None:
    entries = report["entry_kernels"]
    # The kernels are found by introspection of esa.kernels; all eight of today must be among them.
    assert len(entries) >= 8, entries
    not_launched = sorted(set(entries) - set(report["launched"]))
    assert not not_launched, f"kernels that bench.kernel_compile.drive_launchers never launches: {not_launched}"
    for cc in CCS:
        compiled = {v["kernel"] for v in report["variants"] if v["cc"] == cc}
        assert compiled == set(entries), f"sm_{cc}: not compiled: {sorted(set(entries) - compiled)}"
    # Device helpers (load_fp32, _selection_keys, ...) are compiled as part of the kernels that call them.
    from bench.kernel_compile import reachable

    graph = {q: set(c) for q, c in report["graph"].items()}
    assert reachable(entries, graph) == set(graph)
    assert "esa.kernels.floatbits.load_fp32" in graph["esa.kernels.accumulate._accumulate_kernel"]


def test_every_variant_compiles(report: dict) -> None:
    failed = [f"{v['kernel']} sm_{v['cc']} {v['constexprs']}: {v['error'][:400]}" for v in report["variants"]
              if not v["ok"]]
    assert not failed, f"triton {report['triton']}:\n" + "\n".join(failed)


def test_no_spills_and_shared_memory_fits_sm80(report: dict) -> None:
    from bench.kernel_compile import SM80_MAX_SHARED, problems

    compiled = [v for v in report["variants"] if v["ok"]]
    assert compiled and all(v["registers"] > 0 for v in compiled)  # ptxas -v was parsed
    assert not problems({"variants": compiled}), problems({"variants": compiled})
    assert max(v["shared"] + v["static_smem"] for v in compiled) <= SM80_MAX_SHARED


def test_every_constexpr_combination_esa_launches_is_compiled(report: dict) -> None:
    accumulate = importlib.import_module("esa.kernels.accumulate")
    perturb = importlib.import_module("esa.kernels.perturb")
    topk = importlib.import_module("esa.kernels.topk")
    from esa.kernels.floatbits import FLOAT_DTYPES, INPUT_DTYPES, dtype_code

    for cc in CCS:
        acc = {(c["OP"], c["A_DTYPE"], c["B_DTYPE"], c["ROW_SCALE"])
               for v in _variants(report, "_accumulate_kernel") if v["cc"] == cc for c in [v["constexprs"]]}
        expected = set()
        for op in accumulate.OPS:  # esa.scoring passes a and b of the parameter's dtype
            for dtype in INPUT_DTYPES:
                code = dtype_code(dtype)
                for row in ((True, False) if op == "abs_scaled" else (False,)):
                    expected.add((accumulate.OPS.index(op), code, code, row))
        assert acc == expected
        pert = {(v["constexprs"]["KIND"], v["constexprs"]["DTYPE"]) for v in _variants(report, "_perturb_kernel")
                if v["cc"] == cc}
        assert pert == {(k, dtype_code(d)) for k in range(5) for d in FLOAT_DTYPES}
        hist = {(v["constexprs"]["SHIFT"], v["constexprs"]["LARGEST"])
                for v in _variants(report, "_radix_histogram_kernel") if v["cc"] == cc}
        assert hist == {(s, largest) for s in topk._SHIFTS for largest in (True, False)}
        for kernel in ("_count_beyond_and_ties_kernel", "_compact_ordered_kernel", "_compact_all_kernel"):
            assert {v["constexprs"]["LARGEST"] for v in _variants(report, kernel) if v["cc"] == cc} == {True, False}
        scans = {(v["constexprs"]["ABSOLUTE"], v["constexprs"]["NONZERO_MIN"], v["constexprs"]["SUMS"])
                 for v in _variants(report, "_block_scan_kernel") if v["cc"] == cc}
        assert scans == set(itertools.product((False, True), repeat=3))
        restored = {v["signature"]["bits_ptr"] for v in _variants(report, "_restore_kernel") if v["cc"] == cc}
        assert restored == {"*i16", "*i32"}
    assert perturb.BLOCK in {v["constexprs"]["BLOCK"] for v in _variants(report, "_perturb_kernel")}


def test_specialization_is_that_of_a_real_launch(report: dict) -> None:
    """Pointers are 16-byte aligned; sizes divisible by 16 get tt.divisibility, odd ones do not; 1 is a constant."""
    main = _variants(report, "_accumulate_kernel", "main")
    assert main and all({"score_ptr", "a_ptr", "b_ptr", "scale_ptr", "n", "cols"} <= set(v["divisible16"])
                        for v in main)
    odd = _variants(report, "_accumulate_kernel", "alternate")
    assert odd and all("n" not in v["divisible16"] and "n" in v["signature"] for v in odd)
    single = [v for v in _variants(report, "_perturb_kernel") if v["constexprs"].get("n") == 1]
    assert single, "a launch for one selected weight specializes n = 1 as a constant"
    bf16 = [v for v in main if v["constexprs"]["A_DTYPE"] == 0]
    assert all(v["signature"]["a_ptr"] == "*i16" for v in bf16)  # bf16 goes in as its int16 bit view


def test_accumulate_ptx_uses_vector_loads(report: dict) -> None:
    """On model-sized tensors every global load of the accumulation kernel is vectorised (v2 / v4), except the
    per-row scale of act_mag, which is one value per row."""
    main = _variants(report, "_accumulate_kernel", "main")
    assert main
    for v in main:
        loads = v["global_loads"]
        assert any(".v4." in x or ".v2." in x for x in loads), (v["constexprs"], v["cc"], loads)
        if not v["constexprs"]["ROW_SCALE"]:
            assert all(".v4." in x or ".v2." in x for x in loads), (v["constexprs"], v["cc"], loads)


def test_a_kernel_nobody_launches_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """The introspection sees a new kernel added to a module of esa.kernels (so the coverage test would fail)."""
    import triton
    import triton.language as tl

    from bench.kernel_compile import kernel_graph

    accumulate = importlib.import_module("esa.kernels.accumulate")

    def _new_kernel(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)

    _new_kernel.__module__ = accumulate.__name__
    monkeypatch.setattr(accumulate, "_new_kernel", triton.jit(_new_kernel), raising=False)
    entries, graph = kernel_graph()
    assert "esa.kernels.accumulate._new_kernel" in entries
    assert "esa.kernels.accumulate._accumulate_kernel" in entries
    assert "esa.kernels.floatbits.load_fp32" not in entries
