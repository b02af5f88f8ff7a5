"""``python -m bench gpu-check``: measure esa on one CUDA GPU with one command, within a hard time budget.

    bash bench/gpu_check.sh [options]     # installs esa offline (pip --no-deps --no-build-isolation -e .), then:
    python -m bench gpu-check [--budget-s 360] [--layers N] [--out-dir DIR]

Without a CUDA device it stops at once with ``gpu-check: no CUDA device ...`` and exit status 2.

Steps, in order; each runs in its own process under a time limit (its cap, and never past the budget), a failing
step records its error and the next one runs, a step with no time left is skipped with a note:

1. ``device``: GPU, compute capability, memory, versions.
2. ``kernel_tests``: ``pytest tests/test_kernels_*.py`` with the kernels compiled for this GPU (no
   ``TRITON_INTERPRET``; the ahead-of-time compile test is left to CI).
3. ``kernel_bench``: ``python -m bench accumulate topk perturb``: achieved GB/s against the device-to-device copy
   bandwidth measured in the same run.
4. ``end_to_end``: a random-weight model built from ``../shared/models/configs/llama-3.1-8b`` (the same numbers
   are built in for machines without ``../shared``) in bf16, initialised directly on the GPU, windows of 2048
   tokens, batch 1 (the runbook's settings), text tokenized with esa's embedded tokenizer: plain forward + backward
   (every gradient kept), esa's grad_x_weight scoring and the whole ``esa profile --metric grad_x_weight --topk
   100`` path in ``--mode per_layer`` and ``--mode global`` (their overhead over forward + backward), tokens per
   second and peak memory of each, apply + restore of the top-100 against one evaluation, the runbook's baseline
   (``esa baseline``: WikiText-2 test when ``../shared/data`` has it, else the embedded text; 64 windows), and
   ``esa profile --metric hutchinson_diag --mode global`` on one window: every weight matrix at the full window when
   the plan says it fits (its score groups), else runbook command 4's tensors at the longest window that fits.
   Each profile run's planned peak (``esa plan``) is reported next to its measured one. Layers are dropped when the
   model would not fit in memory, and the number kept is reported. Each measurement is saved as it completes.

Writes ``gpu_check.json`` (everything, partial results included) and ``gpu_check.md`` (the summary, also printed)
to the output directory (default ``bench/out``) after every step. ``--device cpu --tiny`` runs the same code path
on a tiny model and tiny sizes on the CPU: it exists for the test suite, and measures nothing of interest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO.parent / "shared" / "models" / "configs" / "llama-3.1-8b"
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw"
NO_CUDA = "gpu-check: no CUDA device (torch.cuda.is_available() is False); run it on a machine with one CUDA GPU"
NO_CUDA_EXIT = 2

#: Llama-3.1-8B's architecture (the config.json of ../shared/models/configs/llama-3.1-8b), for machines without it.
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False,
}
#: --tiny: the same architecture shrunk to a few hundred thousand weights (vocab = the embedded tokenizer's).
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 2048}

#: Seconds each step may take at most (the end-to-end step gets whatever is left of the budget).
CAPS = {"kernel_tests": 160.0, "kernel_bench": 80.0, "end_to_end": None}
#: Seconds kept back at the end of the budget for writing the summary.
RESERVE_S = 5.0
#: A step that would get less than this is skipped.
MIN_STEP_S = 15.0
KERNEL_FAMILIES = ("accumulate", "topk", "perturb")


# --------------------------------------------------------------------------------------------------------------------
# The parent: budget, steps, report


class Budget:
    """A hard wall-clock budget counted from construction."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def run_limited(argv: list[str], env: dict[str, str], limit_s: float, log: Path) -> dict:
    """Run ``argv`` from the repository root with output to ``log``; kill its process group after ``limit_s``."""
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    text = log.read_text(encoding="utf-8", errors="replace")
    return {"returncode": rc, "timed_out": timed_out, "seconds": round(time.monotonic() - start, 2),
            "output_tail": text[-3000:]}


def child_env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ, ESA_PROGRESS="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def device_info(device: str) -> dict:
    import platform

    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for package in ("triton", "transformers"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=round(total / 2**30, 1),
                    free_gib=round(free / 2**30, 1), multiprocessors=props.multi_processor_count,
                    device_count=torch.cuda.device_count())
    else:
        from bench.common import device_name

        info.update(name=device_name(torch.device("cpu")), capability=None)
    return info


def kernel_tests_step(args: argparse.Namespace, limit: float, out_dir: Path) -> dict:
    if args.tiny:
        files = ["tests/test_kernels_dispatch.py"]
    else:
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_kernels_*.py")
                       if p.name != "test_kernels_compile.py")
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--maxfail=20", *files]
    result = run_limited(argv, child_env(TRITON_INTERPRET=None), limit, out_dir / "gpu_check_kernel_tests.log")
    counts = {}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", result["output_tail"]):
        counts[word.rstrip("s") if word.startswith("error") else word] = int(number)
    return {"files": files, "counts": counts, **result}


def kernel_bench_step(args: argparse.Namespace, limit: float, out_dir: Path) -> dict:
    argv = [sys.executable, "-m", "bench", *KERNEL_FAMILIES]
    if args.tiny:
        argv += ["--quick", "--device", "cpu", "--repeats", "1"]
    started = time.time()
    result = run_limited(argv, child_env(ESA_BENCH_OUT=str(out_dir)), limit, out_dir / "gpu_check_kernel_bench.log")
    families = {}
    for family in KERNEL_FAMILIES:
        path = out_dir / f"{family}.json"
        if path.exists() and path.stat().st_mtime >= started:  # written by this run, not an older one
            payload = json.loads(path.read_text())
            families[family] = {"peak_gbps": payload["peak_gbps"], "rows": payload["rows"]}
    return {"families": families, **result}


def end_to_end_step(args: argparse.Namespace, limit: float, out_dir: Path) -> dict:
    partial = out_dir / "gpu_check_end_to_end.partial.json"
    partial.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "bench.gpu_check", "--child-end-to-end", str(partial), "--device", args.device,
            "--config", str(args.config), "--out-dir", str(out_dir)]
    argv += ["--tiny"] if args.tiny else []
    argv += ["--layers", str(args.layers)] if args.layers else []
    argv += ["--seq-len", str(args.seq_len)] if args.seq_len else []
    result = run_limited(argv, child_env(), limit, out_dir / "gpu_check_end_to_end.log")
    measured = json.loads(partial.read_text()) if partial.exists() else {}
    return {"measured": measured, **result}


STEPS: dict[str, Callable[[argparse.Namespace, float, Path], dict]] = {
    "kernel_tests": kernel_tests_step,
    "kernel_bench": kernel_bench_step,
    "end_to_end": end_to_end_step,
}


def run_steps(args: argparse.Namespace, budget: Budget, out_dir: Path) -> dict:
    report: dict = {"budget_s": budget.seconds, "tiny": args.tiny, "device_type": args.device, "steps": {}}
    try:
        report["device"] = device_info(args.device)
    except Exception as e:  # noqa: BLE001 - recorded, the steps still run
        report["device"] = {"error": f"{type(e).__name__}: {e}"}
    write_report(report, out_dir)
    for name, step in STEPS.items():
        left = budget.left() - RESERVE_S
        cap = CAPS[name]
        limit = left if cap is None else min(cap, left)
        if limit < (1.0 if args.tiny else MIN_STEP_S):
            report["steps"][name] = {"status": "skipped", "note": f"skipped: {max(left, 0):.0f} s left of the "
                                     f"{budget.seconds:.0f} s budget"}
        else:
            try:
                result = step(args, limit, out_dir)
                status = "timeout" if result["timed_out"] else ("ok" if result["returncode"] == 0 else "failed")
                report["steps"][name] = {"status": status, "limit_s": round(limit, 1), **result}
            except Exception as e:  # noqa: BLE001 - recorded, the next step still runs
                report["steps"][name] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        report["elapsed_s"] = round(budget.elapsed(), 1)
        write_report(report, out_dir)
    return report


def write_report(report: dict, out_dir: Path) -> str:
    """Write gpu_check.json and gpu_check.md (atomically); return the Markdown."""
    markdown = summary_markdown(report)
    for name, text in (("gpu_check.json", json.dumps(report, indent=1, default=str) + "\n"),
                       ("gpu_check.md", markdown)):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out_dir / name)
    return markdown


# --------------------------------------------------------------------------------------------------------------------
# The summary


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


def _status_line(step: dict) -> str:
    if step.get("status") in ("skipped", "error"):
        return f"**{step['status']}**: {step.get('note') or step.get('error')}"
    note = f"**{step['status']}** in {step['seconds']:.0f} s (limit {step['limit_s']:.0f} s)"
    return note + (": killed at its time limit, partial results below" if step["timed_out"] else "")


def summary_markdown(report: dict) -> str:
    dev = report.get("device", {})
    lines = [f"# gpu-check on {dev.get('name', '?')}", ""]
    if report.get("tiny"):
        lines += ["**--tiny dry run** (test mode): tiny model and sizes; these numbers mean nothing.", ""]
    lines += [f"compute capability {dev.get('capability')}, {dev.get('memory_gib', '-')} GiB; torch {dev.get('torch')} "
              f"(CUDA {dev.get('cuda')}), triton {dev.get('triton')}, transformers {dev.get('transformers')}; "
              f"budget {report['budget_s']:.0f} s, used {report.get('elapsed_s', 0):.0f} s.", ""]
    steps = report["steps"]
    if "kernel_tests" in steps:
        step = steps["kernel_tests"]
        counts = ", ".join(f"{n} {w}" for w, n in step.get("counts", {}).items()) or "no summary line"
        lines += ["## Kernel tests, compiled for this device", "", _status_line(step) + f" — {counts}", ""]
    if "kernel_bench" in steps:
        step = steps["kernel_bench"]
        lines += ["## Kernel benchmarks (GB/s of minimal traffic vs the measured copy bandwidth)", "",
                  _status_line(step), ""]
        for family, data in step.get("families", {}).items():
            rows = data["rows"]
            columns = [c for c in (rows[0] if rows else {}) if c not in ("eager_GBps",)]
            lines += [f"**{family}** (copy bandwidth {data['peak_gbps']:.0f} GB/s)", "", *_table(rows, columns), ""]
    if "end_to_end" in steps:
        step = steps["end_to_end"]
        measured = step.get("measured", {})
        model = measured.get("model", {})
        lines += ["## End to end", "", _status_line(step), ""]
        if model:
            lines += [f"{model.get('description')}: {model.get('layers')} of {model.get('config_layers')} layers, "
                      f"{model.get('parameters', 0):,} parameters, {model.get('dtype')}, initialised on "
                      f"{model.get('device')} in {model.get('init_s', 0):.1f} s; windows of {model.get('seq_len')} "
                      f"tokens, batch 1; text: {model.get('text')}.", ""]
            if model.get("layers_note"):
                lines += [model["layers_note"], ""]
        rows = [{"measure": k, **v} for k, v in measured.items() if k != "model"]
        if rows:
            lines += _table(rows, ["measure", "ms", "tokens_per_s", "peak_gib", "planned_peak_gib", "planned_over_measured",
                                  "reference", "ratio", "note"]) + [""]
    errors = {k: v for k, v in steps.items() if v.get("status") in ("failed", "error", "timeout")}
    if errors:
        lines += ["## Problems", ""]
        for name, step in errors.items():
            tail = (step.get("error") or step.get("output_tail") or "").strip().splitlines()[-6:]
            lines += [f"- {name}: {step['status']}", "", "```", *tail, "```", ""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# The end-to-end child process


class Partial:
    """Measurements saved to a JSON file as each one completes (so a killed run keeps what it measured)."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {}

    def save(self, name: str, value: dict) -> None:
        self.data[name] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str), encoding="utf-8")
        tmp.replace(self.path)


def load_architecture(config_dir: Path, tiny: bool):
    """(config, description): the config.json in ``config_dir``, else the built-in Llama-3.1-8B numbers."""
    from transformers import AutoConfig, LlamaConfig

    if (config_dir / "config.json").exists():
        config, described = AutoConfig.from_pretrained(config_dir), f"random-weight {config_dir.name}"
    else:
        config, described = LlamaConfig(**LLAMA_31_8B), "random-weight llama-3.1-8b (built-in copy of its config)"
    if tiny:
        for key, value in TINY.items():
            setattr(config, key, value)
        config.head_dim = config.hidden_size // config.num_attention_heads
        described += " shrunk to a tiny size (--tiny)"
    return config, described


def count_parameters(config) -> tuple[int, int]:
    """(parameters outside the blocks, parameters of one block), from a model built on the meta device."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(one)
    block = sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in n)
    return sum(p.numel() for p in model.parameters()) - block, block


def layers_that_fit(config, seq_len: int, free_bytes: int) -> tuple[int, int]:
    """(layers, parameters): the most layers whose profile fits in 85% of ``free_bytes``.

    Peak of the profile step ≈ 2N (bf16 weights) + 4N (fp32 scores) + activations (≈ 64 bytes per token per hidden
    unit per layer with the autograd graph) + fp32 logits, their gradient and softmax (≈ 16 bytes per token per
    vocabulary entry).
    """
    outside, block = count_parameters(config)
    for layers in range(config.num_hidden_layers, 0, -1):
        n = outside + layers * block
        need = 6 * n + 64 * seq_len * config.hidden_size * layers + 16 * seq_len * config.vocab_size
        if need <= 0.85 * free_bytes:
            return layers, n
    return 1, outside + block


def _peak_gib(cuda: bool) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None


def _reset_peak(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def random_model(config, described: str, device, dtype):
    """(LoadedModel, corpus, token ids, whether the text is WikiText-2, seconds to build): a random-weight model
    from ``config``, created and initialised on ``device`` itself, with esa's embedded tokenizer and WikiText-2's
    test text (the embedded text when ``../shared/data`` lacks it), tokenized."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from esa.corpus import load_corpus
    from esa.modeling import LoadedModel
    from esa.tiny import ASSETS_DIR
    from esa.windows import tokenize

    start = time.perf_counter()
    with torch.device(device):  # parameters are created and initialised on the device itself
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    init_s = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR)
    wikitext = (WIKITEXT / "wiki.test.raw").exists()
    corpus = load_corpus("wikitext2", dataset_path=WIKITEXT) if wikitext else load_corpus("embedded")
    loaded = LoadedModel(model=model, tokenizer=tokenizer, model_id=described, source="random", revision=None,
                         dtype=dtype, device=torch.device(device),
                         max_positions=getattr(config, "max_position_embeddings", None))
    return loaded, corpus, tokenize(tokenizer, corpus.text), wikitext, init_s


def end_to_end_child(args: argparse.Namespace) -> int:
    """Measure one random-weight model end to end; every measurement goes to ``--child-end-to-end`` at once."""
    import torch

    from bench.end_to_end import plain_forward_backward, timed_ms
    from esa.commands.baseline import run_baseline
    from esa.config import BaselineConfig, DataConfig, ModelConfig, ProfileConfig, SelectionConfig
    from esa.evaluate import evaluate
    from esa.perturbation import PerturbSpec, perturbed
    from esa.commands.profile import run_profile
    from esa.progress import quiet
    from esa.scoring import compute_scores
    from esa.selection import select_extreme
    from esa.session import Session
    from esa.tensors import select_tensors
    from esa.windows import make_windows

    out = Partial(Path(args.child_end_to_end))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    seq_len = args.seq_len or (32 if args.tiny else 2048)
    timing_windows, baseline_windows, repeats = (2, 4, 1) if args.tiny else (4, 64, 2)
    dtype = torch.bfloat16
    run_dir = Path(args.out_dir) / "gpu_check_runs"

    config, described = load_architecture(Path(args.config), args.tiny)
    config_layers = config.num_hidden_layers
    note = None
    if args.layers:
        layers = min(args.layers, config_layers)
        note = f"--layers {args.layers}: {layers} of {config_layers} layers"
    elif cuda:
        layers, _ = layers_that_fit(config, seq_len, torch.cuda.mem_get_info()[0])
        if layers < config_layers:
            note = (f"only {layers} of {config_layers} layers fit the profile step in this GPU's free memory "
                    "(6 bytes per weight + activations); times scale about linearly with layers")
    else:
        layers = config_layers
    config.num_hidden_layers = layers

    torch.manual_seed(0)
    _reset_peak(cuda)
    loaded, corpus, ids, wikitext, init_s = random_model(config, described, device, dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    windows = make_windows(ids, seq_len, max_samples=timing_windows, seed=0, max_positions=loaded.max_positions)
    session = Session(loaded=loaded, corpus=corpus, windows=windows)
    n_params = sum(p.numel() for p in model.parameters())
    out.save("model", {
        "description": described, "layers": layers, "config_layers": config_layers, "layers_note": note,
        "parameters": n_params, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
        "init_s": round(init_s, 2), "init_peak_gib": _peak_gib(cuda), "seq_len": seq_len,
        "timing_windows": windows.n,
        "text": ("WikiText-2 raw test" if wikitext else "the embedded text (../shared/data/wikitext-2-raw absent)")
        + f", embedded tokenizer (vocab {len(tokenizer)})",
    })
    tensors = select_tensors(model)
    params = [p for _, p in tensors]
    ids_t = windows.input_ids
    tokens = ids_t.numel()

    def measure(name: str, fn: Callable[[], dict]) -> dict | None:
        """Run one measurement; save its result, or its error (the next measurement still runs)."""
        _reset_peak(cuda)
        try:
            with quiet():
                result = fn()
            result["peak_gib"] = _peak_gib(cuda)
        except Exception as e:  # noqa: BLE001 - recorded in the report
            result = {"note": f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            _reset_peak(cuda)
        out.save(name, result)
        return result

    fb = measure("forward+backward", lambda: _rate(timed_ms(
        lambda: plain_forward_backward(model, params, ids_t, 1, device), cuda, repeats), tokens))
    fb_ms = (fb or {}).get("ms")

    held: dict = {}

    def score() -> dict:
        def once():
            held.clear()  # never two score sets alive at once (4 bytes per weight each)
            held["scores"] = compute_scores(model, tensors, ids_t, "grad_x_weight", batch_size=1)

        return _rate(timed_ms(once, cuda, repeats), tokens, fb_ms, "forward+backward",
                     "fold of every gradient into fp32 scores (Triton accumulate); warm-up call not timed")

    measure("profile scoring grad_x_weight", score)

    def apply_restore() -> dict:
        if "scores" not in held:
            raise RuntimeError("no scores (the scoring measurement failed)")
        chosen = select_extreme(held.pop("scores"), 100, "global")
        named = dict(model.named_parameters())
        eval_ms = timed_ms(lambda: evaluate(model, ids_t, batch_size=1), cuda, repeats)
        out.save("one evaluation", {**_rate(eval_ms, tokens), "note": f"{windows.n} windows, batch 1"})

        def trial(verify: bool) -> None:
            with perturbed(named, chosen, PerturbSpec("zero"), 0, verify=verify):
                pass

        verified = timed_ms(lambda: trial(True), cuda, repeats)
        out.save("apply+restore k=100 +verify", {"ms": verified, "reference": "one evaluation",
                                                 "ratio": verified / eval_ms,
                                                 "note": "with the restore fingerprint check"})
        plain = timed_ms(lambda: trial(False), cuda, repeats)
        return {"ms": plain, "reference": "one evaluation", "ratio": plain / eval_ms,
                "note": f"zero the global top-{len(chosen)} by grad_x_weight, then restore"}

    measure("apply+restore k=100", apply_restore)
    held.clear()

    data = DataConfig(dataset="wikitext2" if wikitext else "embedded", dataset_path=str(WIKITEXT) if wikitext else None,
                      seq_len=seq_len, batch_size=1)
    model_cfg = ModelConfig(model=described, dtype="bfloat16", device=str(device))

    def baseline() -> dict:
        base_windows = make_windows(ids, seq_len, max_samples=baseline_windows, seed=0,
                                    max_positions=loaded.max_positions)
        base_session = Session(loaded=loaded, corpus=corpus, windows=base_windows)
        cfg = BaselineConfig(model=model_cfg, data=DataConfig(**{**vars(data), "max_samples": baseline_windows}),
                             out_dir=str(run_dir / "baseline"), overwrite=True)
        start = time.perf_counter()
        result = run_baseline(cfg, session=base_session)
        ms = (time.perf_counter() - start) * 1e3
        m = result.metrics
        return {**_rate(ms, base_windows.input_ids.numel()), "ppl": m["ppl"],
                "uniform_guess_ppl": m["uniform_guess_ppl"], "windows": base_windows.n,
                "note": f"esa baseline, {base_windows.n} windows: PPL {m['ppl']:.4g} (a random model: about the "
                        f"vocabulary, {m['uniform_guess_ppl']}), accuracy {m['accuracy']:.3g}, "
                        f"leak suspected: {m['leak_suspected']}"}

    measure("baseline (runbook)", baseline)

    def profile(mode: str) -> Callable[[], dict]:
        def run() -> dict:
            cfg = ProfileConfig(model=model_cfg, data=DataConfig(**{**vars(data), "max_samples": timing_windows}),
                                selection=SelectionConfig(metric="grad_x_weight", mode=mode, topk=100),
                                out_dir=str(run_dir / f"profile_{mode}"), overwrite=True)
            start = time.perf_counter()
            result = run_profile(cfg, session=session)
            ms = (time.perf_counter() - start) * 1e3
            manifest = json.loads((Path(result["out_dir"]) / "experiment_manifest.json").read_text())
            phases = ", ".join(f"{k} {v:.2f} s" for k, v in manifest.get("timings_s", {}).items() if k != "total")
            return {**_rate(ms, tokens, fb_ms, "forward+backward",
                            f"esa profile --metric grad_x_weight --mode {mode} --topk 100, one run: {phases}"),
                    **_plan_vs_measured(manifest)}

        return run

    measure("esa profile grad_x_weight per_layer", profile("per_layer"))
    measure("esa profile grad_x_weight global", profile("global"))

    def hutchinson() -> dict:
        """The heaviest metric (second order) with ``--mode global``: over every weight matrix at the full window
        when the plan says it fits (score groups from the plan), else on runbook command 4's tensors at the longest
        window the plan says fits; measured against the plan's peak."""
        from esa.planning import plan_loaded

        total = torch.cuda.get_device_properties(device).total_memory if cuda else 1 << 62
        tried: dict = {}
        for include in ([], ["*layers.[0-3].mlp.*"]):
            scored = [t for t, _ in select_tensors(model, include=include)]
            for s in (seq_len, seq_len // 2, seq_len // 4):
                p = plan_loaded(model, scored, command="profile", metric="hutchinson_diag", seq_len=s, n_windows=1,
                                batch_size=1, score_groups=None, hutchinson_probes=1, device=str(device),
                                device_memory=total)
                tried[f"{include[0] if include else 'all'} @ {s}"] = round(p.peak_bytes / 2**30, 2)
                if p.fits:
                    break
            if p.fits:
                break
        else:
            return {"note": f"the plan fits none of these (planned GiB): {tried}"}
        sel = SelectionConfig(metric="hutchinson_diag", mode="global", topk=100, include=include,
                              hutchinson_probes=1, score_groups=p.score_groups)
        h_windows = make_windows(ids, s, max_samples=1, seed=0, max_positions=loaded.max_positions)
        h_session = Session(loaded=loaded, corpus=corpus, windows=h_windows)
        cfg = ProfileConfig(model=model_cfg, data=DataConfig(**{**vars(data), "seq_len": s, "max_samples": 1}),
                            selection=sel, out_dir=str(run_dir / "profile_hutchinson"), overwrite=True)
        start = time.perf_counter()
        result = run_profile(cfg, session=h_session)
        ms = (time.perf_counter() - start) * 1e3
        manifest = json.loads((Path(result["out_dir"]) / "experiment_manifest.json").read_text())
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in manifest.get("timings_s", {}).items() if k != "total")
        flags = f" --include '{include[0]}'" if include else ""
        return {**_rate(ms, h_windows.input_ids.numel()), **_plan_vs_measured(manifest),
                "note": f"esa profile --metric hutchinson_diag --mode global{flags} --hutchinson-probes 1 "
                        f"--score-groups {p.score_groups}, 1 window of {s} tokens: {phases} "
                        f"(planned peak GiB tried: {tried})"}

    measure("esa profile hutchinson_diag global", hutchinson)
    return 0


def _plan_vs_measured(manifest: dict) -> dict:
    """A run manifest's planned peak (esa.planning) next to its measured one."""
    memory = manifest.get("memory", {})
    planned, measured = memory.get("planned_peak_bytes"), memory.get("measured_peak_bytes")
    if not planned or not measured:
        return {}
    return {"planned_peak_gib": round(planned / 2**30, 2), "run_measured_peak_gib": round(measured / 2**30, 2),
            "planned_over_measured": round(planned / measured, 3)}


def _rate(ms: float, tokens: int, reference_ms: float | None = None, reference: str | None = None,
          note: str | None = None) -> dict:
    row = {"ms": ms, "tokens_per_s": tokens / (ms / 1e3) if ms > 0 else None}
    if reference_ms:
        row.update(reference=reference, ratio=ms / reference_ms)
    if note:
        row["note"] = note
    return row


# --------------------------------------------------------------------------------------------------------------------
# Entry point


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=360.0, help="hard wall-clock budget of all steps")
    parser.add_argument("--layers", type=int, default=None, help="end to end: layers to keep (default: all that fit)")
    parser.add_argument("--seq-len", type=int, default=None, help="end to end: window length (default 2048)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="model config directory (config.json)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "out", help="where the results go")
    parser.add_argument("--check-device", action="store_true", help="only check for a CUDA device (exit 2 if none)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-end-to-end", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.device == "cpu" and not args.tiny:
        print("gpu-check: --device cpu is only the --tiny dry run of the test suite", file=sys.stderr)
        return NO_CUDA_EXIT
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return NO_CUDA_EXIT
    if args.check_device:
        return 0
    if args.child_end_to_end:
        return end_to_end_child(args)
    budget = Budget(args.budget_s)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = run_steps(args, budget, args.out_dir)
    print(write_report(report, args.out_dir))
    print(f"wrote {args.out_dir / 'gpu_check.json'} and gpu_check.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
