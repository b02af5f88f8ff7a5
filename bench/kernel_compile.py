"""Ahead-of-time compilation of every Triton kernel of ``esa.kernels`` for real GPU targets, without a GPU.

    python -m bench.kernel_compile [--cc 80,90] [--all] [--json PATH]

Triton decides when a kernel is decorated whether it is interpreted, so the work is split over two processes:

1. ``record`` (``TRITON_INTERPRET=1``, CPU tensors): drive every launcher of ``esa.kernels`` over the combinations
   esa launches (every accumulate op on every model dtype, a and b of one dtype as in ``esa.scoring``, both act_mag
   scale kinds; every perturbation kernel code on every weight dtype; top-k and bottom-k through both compaction
   paths; the one-read scan with and without |x|, non-zero minima and power sums) on a model-like shape (every size a multiple of 16) and an odd one, and record each kernel launch: its
   tensors as (dtype, 16-byte alignment), its scalars and keyword arguments as values.
2. ``compile`` (no interpreter): rebuild each launch's arguments and let Triton's own launch-time specialization
   (the binder and ``_pack_args`` that ``JITFunction.run`` uses) turn them into the signature, constexprs,
   ``tt.divisibility`` attributes and options of a real launch; then ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", cc, 32))`` for each compute capability. For each distinct variant it reports the
   global load widths in the PTX, the registers / spills / static shared memory from ``ptxas -v`` and Triton's
   dynamic shared memory.

The kernels themselves are found by introspection: every ``@triton.jit`` function defined in a module of
``esa.kernels``; those that no other jit function calls are entry kernels, the others device helpers.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import inspect
import itertools
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

#: Dynamic shared memory one block may use on sm_80 (A100, opt-in maximum: 163 KiB).
SM80_MAX_SHARED = 166912
DEFAULT_CC = (80, 90)
REPO = Path(__file__).resolve().parents[1]

_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_GLOBAL_LOAD = re.compile(r"\bld\.global(?:\.[\w]+)*")


# --------------------------------------------------------------------------------------------------------------------
# Introspection


def _is_jit(value) -> bool:
    """A Triton jit function, compiled (JITFunction) or interpreted (InterpretedFunction, TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return isinstance(value, (JITFunction, InterpretedFunction))


def jit_functions() -> dict[str, object]:
    """``module.name`` -> every Triton jit function defined (not merely imported) in a module of ``esa.kernels``."""
    import esa.kernels

    found = {}
    for info in pkgutil.iter_modules(esa.kernels.__path__):
        module = importlib.import_module(f"esa.kernels.{info.name}")
        for name, value in vars(module).items():
            if _is_jit(value) and getattr(value.fn, "__module__", None) == module.__name__:
                found[f"{module.__name__}.{name}"] = value
    return found


def _callees(jit_fn, everything: dict[str, object]) -> set[str]:
    """Qualified names of the jit functions that ``jit_fn``'s body calls (resolved in its module's globals)."""
    by_identity = {id(f): q for q, f in everything.items()}
    tree = ast.parse(inspect.getsource(jit_fn.fn).lstrip())
    called = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            target = jit_fn.fn.__globals__.get(node.func.id)
            if id(target) in by_identity:
                called.add(by_identity[id(target)])
    return called


def kernel_graph() -> tuple[list[str], dict[str, set[str]]]:
    """(entry kernels, call graph): entry kernels are the jit functions that no other jit function calls."""
    everything = jit_functions()
    graph = {q: _callees(f, everything) for q, f in everything.items()}
    called = set().union(*graph.values()) if graph else set()
    return sorted(q for q in everything if q not in called), graph


def reachable(roots: list[str], graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        q = todo.pop()
        if q not in seen:
            seen.add(q)
            todo.extend(graph.get(q, ()))
    return seen


# --------------------------------------------------------------------------------------------------------------------
# Step 1: record the launches (interpreter)


def _encode(value):
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "align16": value.data_ptr() % 16 == 0}
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


#: What the launches being driven stand for: "main" (the usual sizes of a model) or "alternate" (odd sizes, one
#: selected weight: the other integer specializations of the same kernels).
_tag = ["main"]


class _Recorder:
    """Stands in for a kernel in its module: ``kernel[grid](...)`` records the call, then runs the real kernel."""

    def __init__(self, qualname: str, kernel, log: list[dict]) -> None:
        self.qualname, self.kernel, self.log = qualname, kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append({"kernel": self.qualname, "tag": _tag[0], "args": [_encode(a) for a in args],
                             "kwargs": {k: _encode(v) for k, v in kwargs.items()}})
            return self.kernel[grid](*args, **kwargs)

        return launch


def drive_launchers() -> None:
    """Call every Triton launcher of esa.kernels over the combinations that esa itself launches."""
    import torch

    from esa.kernels.floatbits import FLOAT_DTYPES, INPUT_DTYPES, int_view_dtype

    # By module (esa.kernels re-exports a function named topk that hides the submodule of that name).
    accumulate, blockscan, perturb, topk = (importlib.import_module(f"esa.kernels.{m}")
                                            for m in ("accumulate", "blockscan", "perturb", "topk"))

    g = torch.Generator().manual_seed(0)
    for shape in ((64, 48), (5, 7)):  # model-like (sizes divisible by 16), then odd
        rows, cols = shape
        _tag[0] = "main" if shape == (64, 48) else "alternate"
        for dtype in INPUT_DTYPES:  # scoring: the gradient, weight, probe and Hz share the parameter's dtype
            a, b = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
            for op in accumulate.OPS:
                score = torch.zeros(shape)
                if op == "abs_scaled":
                    accumulate.accumulate_triton(op, score, a, row_scale=torch.rand(rows, generator=g))
                    accumulate.accumulate_triton(op, score, a, col_scale=torch.rand(cols, generator=g))
                else:
                    accumulate.accumulate_triton(op, score, a, b if op in ("abs_product", "product") else None)
        continuous = torch.rand(shape, generator=g)
        ties = torch.zeros(shape)  # every key equal: the ordered compaction that keeps the first ties
        for largest in (True, False):
            for score in (continuous, ties):
                topk.topk_triton(score, 10, largest)
        for absolute, nonzero_min, shift in itertools.product((False, True), (False, True), (None, 0.5)):
            blockscan.block_scan(continuous, shift=shift, absolute=absolute, nonzero_min=nonzero_min)  # the one read
    weight_shape = (64, 48)
    for k in (100, 16, 1):  # --topk 100 (the default), an aligned count, a single weight
        _tag[0] = "main" if k == 100 else "alternate"
        for dtype in FLOAT_DTYPES:
            weight = torch.randn(weight_shape, generator=g).to(dtype)
            idx = torch.randperm(weight.numel(), generator=g)[:k]
            extras = {
                "zero": [{}],
                "sign_flip": [{"scale": 1.0}, {"scale": 0.5}],  # sign-bit XOR and fp32 multiplication
                "gauss_noise": [{"scale": 0.1, "noise": torch.randn(k, generator=g)}],
                "bit_flip": [{"xor_mask": torch.ones(k, dtype=int_view_dtype(dtype))}],
            }
            for kind in perturb.KINDS:
                for kwargs in extras[kind]:
                    original = perturb.apply_perturbation_triton(weight, idx, kind, **kwargs)
                    perturb.restore_triton(weight, idx, original)
    _tag[0] = "main"


def record() -> list[dict]:
    """Run :func:`drive_launchers` with every entry kernel replaced by a recorder; return the launches."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the record step needs TRITON_INTERPRET=1 (set before esa.kernels is imported)")
    from esa.kernels.dispatch import force_backend

    entries, _ = kernel_graph()
    log: list[dict] = []
    originals = {}
    for qualname in entries:
        module_name, name = qualname.rsplit(".", 1)
        module = sys.modules[module_name]
        originals[(module, name)] = getattr(module, name)
        setattr(module, name, _Recorder(qualname, originals[(module, name)], log))
    try:
        with force_backend("triton"):
            drive_launchers()
    finally:
        for (module, name), value in originals.items():
            setattr(module, name, value)
    return log


# --------------------------------------------------------------------------------------------------------------------
# Step 2: compile (no interpreter)


def _decode(value):
    import torch

    if isinstance(value, dict) and "tensor" in value:
        if not value["align16"]:
            raise ValueError("a launch passed a tensor that is not 16-byte aligned; extend _decode to offset it")
        return torch.empty(16, dtype=getattr(torch, value["tensor"]))
    return value


def specialize(jit_fn, backend, args: list, kwargs: dict) -> tuple[dict, dict, dict, object]:
    """Triton's launch-time specialization of one call: (signature, constexprs, attrs, options)."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def _ptxas_cache() -> Path:
    base = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")
    return Path(base) / "esa_ptxas_usage"


def ptxas_usage(ptx: str, cc: int, fp_fusion: bool) -> dict:
    """Registers, spill bytes and static shared memory of ``ptx`` from ``ptxas -v`` (the triton wheel's ptxas).

    Cached by the hash of (ptxas, arch, flags, PTX) next to Triton's own cache, as compiled kernels are.
    """
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(cc).path
    flags = ["-v", *([] if fp_fusion else ["--fmad=false"]), f"--gpu-name={sm_arch_from_capability(cc)}"]
    key = hashlib.sha256("\0".join([ptxas, *flags, ptx]).encode()).hexdigest()
    cached = _ptxas_cache() / f"{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([ptxas, *flags, str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs, spills, smem = _PTXAS_USAGE.search(log), _PTXAS_SPILLS.search(log), _PTXAS_SMEM.search(log)
    if not (regs and spills):
        raise RuntimeError(f"unexpected ptxas -v output: {log.strip()[:300]}")
    usage = {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)),
             "spill_loads": int(spills.group(2)), "static_smem": int(smem.group(1)) if smem else 0}
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_file.write_text(json.dumps(usage))
    tmp_file.replace(cached)
    return usage


def _variant(jit_fn, launch: dict, cc: int) -> dict:
    """What a real launch of ``launch`` compiles for ``cc``: Triton's specialization, plus a key to dedupe on."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", cc, 32)
    signature, constexprs, attrs, options = specialize(
        jit_fn, make_backend(target), [_decode(a) for a in launch["args"]],
        {k: _decode(v) for k, v in launch["kwargs"].items()})
    names = list(signature)
    shown = {
        "kernel": launch["kernel"],
        "cc": cc,
        "constexprs": {names[path[0]]: _plain(v) for path, v in sorted(constexprs.items())},
        "signature": {k: v for k, v in signature.items() if v != "constexpr"},
        "divisible16": sorted(names[path[0]] for path, a in attrs.items() if a),
        "num_warps": options.num_warps,
    }
    declared = {p.name for p in jit_fn.params if p.is_constexpr}  # not the integers specialized to a constant
    combo = json.dumps({k: v for k, v in shown["constexprs"].items() if k in declared}, sort_keys=True)
    return {**shown, "tag": launch["tag"], "key": json.dumps(shown, sort_keys=True), "combo": combo,
            "_compile": (target, signature, constexprs, attrs, options)}


def _compile_variant(jit_fn, variant: dict) -> dict:
    import triton
    from triton.compiler import ASTSource

    target, signature, constexprs, attrs, options = variant.pop("_compile")
    result = dict(variant)
    try:
        compiled = triton.compile(ASTSource(jit_fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        ptx = compiled.asm["ptx"]
        result.update(ok=True, error=None, shared=int(compiled.metadata.shared),
                      global_loads=sorted(set(_GLOBAL_LOAD.findall(ptx))),
                      **ptxas_usage(ptx, target.arch, options.enable_fp_fusion))
    except Exception as e:  # noqa: BLE001 - every failure is a result to report
        result.update(ok=False, error=f"{type(e).__name__}: {' '.join(str(e).split())[:2000]}")
    return result


def select_variants(variants: list[dict], everything: bool) -> list[dict]:
    """Distinct variants to compile: every "main" one; of the "alternate" ones (other integer specializations),
    all with ``everything``, else those of one constexpr combination per kernel and cc (the first recorded)."""
    chosen, seen, representative = [], set(), {}
    for v in variants:
        if v["key"] in seen:
            continue
        if v["tag"] != "main" and not everything:
            if representative.setdefault((v["kernel"], v["cc"]), v["combo"]) != v["combo"]:
                continue
        seen.add(v["key"])
        chosen.append(v)
    return chosen


def _plain(value):
    value = getattr(value, "value", value)  # tl.constexpr wrappers
    return value if isinstance(value, (bool, int, float, str)) or value is None else repr(value)


def compile_all(launches: list[dict], ccs: tuple[int, ...] = DEFAULT_CC, everything: bool = False) -> dict:
    """Compile the distinct launch variants (:func:`select_variants`) for every cc; one result row per variant."""
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile step must run without TRITON_INTERPRET")
    functions = jit_functions()
    entries, graph = kernel_graph()
    variants = [_variant(functions[launch["kernel"]], launch, cc) for cc in ccs for launch in launches]
    rows = [_compile_variant(functions[v["kernel"]], v) for v in select_variants(variants, everything)]
    return {"triton": triton.__version__, "ccs": list(ccs), "entry_kernels": entries,
            "graph": {q: sorted(c) for q, c in graph.items()}, "launched": sorted({x["kernel"] for x in launches}),
            "variants": rows}


# --------------------------------------------------------------------------------------------------------------------
# Both steps, each in its own process


def _run_step(argv: list[str], env_update: dict[str, str | None], timeout: float) -> None:
    env = dict(os.environ)
    for k, v in env_update.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    proc = subprocess.run([sys.executable, "-m", "bench.kernel_compile", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        tail = (proc.stdout + proc.stderr).strip()[-3000:]
        raise RuntimeError(f"python -m bench.kernel_compile {' '.join(argv)} failed (exit {proc.returncode}):\n{tail}")


def run(ccs: tuple[int, ...] = DEFAULT_CC, timeout: float = 600.0, everything: bool = False) -> dict:
    """Record in an interpreter process, compile in a plain one; return :func:`compile_all`'s report."""
    with tempfile.TemporaryDirectory() as tmp:
        launches, report = Path(tmp) / "launches.json", Path(tmp) / "report.json"
        _run_step(["--step", "record", "--out", str(launches)], {"TRITON_INTERPRET": "1"}, timeout)
        _run_step(["--step", "compile", "--launches", str(launches), "--out", str(report),
                   "--cc", ",".join(map(str, ccs)), *(["--all"] if everything else [])],
                  {"TRITON_INTERPRET": None}, timeout)
        return json.loads(report.read_text())


def problems(report: dict) -> list[str]:
    """Everything a real GPU would reject or run badly, one line each (empty when all is well)."""
    out = []
    for v in report["variants"]:
        where = f"{v['kernel']} sm_{v['cc']} {v['constexprs']}"
        if not v["ok"]:
            out.append(f"{where}: does not compile: {v['error'][:300]}")
            continue
        if v["spill_stores"] or v["spill_loads"]:
            out.append(f"{where}: spills registers ({v['spill_stores']} B stored, {v['spill_loads']} B loaded)")
        if v["shared"] + v["static_smem"] > SM80_MAX_SHARED:
            out.append(f"{where}: {v['shared'] + v['static_smem']} B of shared memory > sm_80's {SM80_MAX_SHARED}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cc", default=",".join(map(str, DEFAULT_CC)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--json", type=Path, help="write the full report there")
    parser.add_argument("--all", action="store_true",
                        help="every recorded integer specialization of every combination (slower)")
    parser.add_argument("--step", choices=("record", "compile"), help=argparse.SUPPRESS)
    parser.add_argument("--launches", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ccs = tuple(int(c) for c in args.cc.split(","))
    if args.step == "record":
        args.out.write_text(json.dumps(record()))
        return 0
    if args.step == "compile":
        args.out.write_text(json.dumps(compile_all(json.loads(args.launches.read_text()), ccs, args.all)))
        return 0
    report = run(ccs, everything=args.all)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    for v in report["variants"]:
        status = "ok" if v["ok"] else "FAILED"
        detail = (f"regs {v['registers']:3d} spills {v['spill_stores'] + v['spill_loads']} shared {v['shared']:6d} "
                  f"loads {','.join(x.removeprefix('ld.global') or '.scalar' for x in v['global_loads'])}"
                  if v["ok"] else v["error"][:200])
        print(f"{status:6} sm_{v['cc']} {v['kernel'].rsplit('.', 1)[1]:32} {json.dumps(v['constexprs'])} {detail}")
    bad = problems(report)
    print(f"triton {report['triton']}: {len(report['variants'])} variants of {len(report['entry_kernels'])} kernels, "
          f"{len(bad)} problem(s)")
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
