"""The plan's peak memory against the measured one, on CPU, for a random-weight Llama (issue 14, point 6).

    python -m bench.plan_vs_measured                 # ~58M parameters: hidden 512, 8 layers, vocab 32000
    python -m bench.plan_vs_measured --hidden 64 --layers 2 --vocab 512 --seq-len 32   # a quick smoke run

Every case runs in a fresh process (peak RSS is per process): baseline (evaluation), grad_x_weight and
hutchinson_diag scoring with one score group, and grad_x_weight with three (more groups must lower the peak).
Per case: the measured peak RSS, the RSS right after the imports (the interpreter and libraries), the plan's peak
(:func:`esa.planning.plan_loaded`, whose CPU workspace stands for that import baseline) and their ratio. Writes
bench/out/plan_vs_measured.json. The goal: the plan within 25% of the measured peak for every case.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

CASES = (("baseline", "grad_x_weight", 1), ("score", "grad_x_weight", 1), ("score", "hutchinson_diag", 1),
         ("score", "grad_x_weight", 3))


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def build_model(hidden: int, layers: int, vocab: int, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                         intermediate_size=int(hidden * 8 / 3) // 32 * 32 or 32, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)


def measure(phase: str, metric: str, groups: int, *, hidden: int, layers: int, vocab: int, seq_len: int,
            windows: int, batch_size: int, probes: int = 1) -> dict:
    """One case in this process: run it, and return the measured and planned peaks."""
    import torch

    from esa.evaluate import evaluate
    from esa.planning import plan_loaded
    from esa.scoregroups import split_groups
    from esa.scoreselect import reduce_scores
    from esa.scoring import compute_scores
    from esa.tensors import select_tensors

    after_imports = _rss()
    model = build_model(hidden, layers, vocab)
    ids = torch.randint(0, vocab, (windows, seq_len), generator=torch.Generator().manual_seed(0))
    tensors = select_tensors(model)
    if phase == "baseline":
        evaluate(model, ids, batch_size=batch_size)
    else:
        for group in split_groups([t for t, _ in tensors], groups):
            scores = compute_scores(model, tensors, ids, metric, batch_size=batch_size, hutchinson_probes=probes,
                                    group=[t.name for t in group])
            reduce_scores(scores, 100, summarize=True, seed=0)
            del scores
    measured = _rss()
    p = plan_loaded(model, [t for t, _ in tensors], command="baseline" if phase == "baseline" else "profile",
                    metric=metric, seq_len=seq_len, n_windows=windows, batch_size=batch_size,
                    score_groups=groups, hutchinson_probes=probes, device="cpu")
    planned = p.peak_bytes
    return {"phase": phase, "metric": metric, "score_groups": groups, "measured_peak_bytes": measured,
            "rss_after_imports_bytes": after_imports, "planned_peak_bytes": planned,
            "planned_over_measured": planned / measured,
            "parameters": sum(x.numel() for x in model.parameters()),
            "parts": {ph.name: ph.parts for ph in p.phases}}


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.plan_vs_measured", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    size = dict(hidden=args.hidden, layers=args.layers, vocab=args.vocab, seq_len=args.seq_len,
                windows=args.windows, batch_size=args.batch_size)
    if args.one:
        phase, metric, groups = json.loads(args.one)
        print(json.dumps(measure(phase, metric, groups, **size)))
        return 0
    rows = []
    for case in CASES:
        cmd = [sys.executable, "-m", "bench.plan_vs_measured", *sum(([f"--{k.replace('_', '-')}", str(v)]
                                                                      for k, v in size.items()), []),
               "--one", json.dumps(case)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'phase':<9}{'metric':<17}{'groups':>7}{'measured MiB':>14}{'planned MiB':>13}{'planned/measured':>18}")
    for r in rows:
        print(f"{r['phase']:<9}{r['metric']:<17}{r['score_groups']:>7}{r['measured_peak_bytes'] / 2**20:>14.0f}"
              f"{r['planned_peak_bytes'] / 2**20:>13.0f}{r['planned_over_measured']:>18.2f}")
    out_dir = Path(__file__).resolve().parent / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "plan_vs_measured.json").write_text(json.dumps({"size": size, "cases": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
