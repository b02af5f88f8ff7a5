"""Selection + statistics against scoring time for grad_x_weight per_layer (issue 14, point 7).

    python -m bench.selection_vs_scoring           # one Llama-3.1-8B-shaped layer: hidden 4096, vocab 128256,
                                                   # 1.3B float32 parameters (about 16 GB of host memory)
    python -m bench.selection_vs_scoring --hidden 256 --intermediate 688 --vocab 8000   # a quick run

Times, on one 128-token window, after one untimed warm-up of both (Triton compiles its kernels and CUDA loads its
modules on first use; ``--no-warmup`` times the first call): the score phase (:func:`esa.scoring.compute_scores`), then selection and
statistics from the score buffers (:func:`esa.scoreselect.reduce_scores` — per buffer one read
(:func:`esa.scorescan.scan`: block extrema, zeros, float64 power sums) and two selections among the best blocks —
plus the per-layer merge and :func:`esa.scorestats.score_statistics`); then the scan of every buffer on its own, with
the bandwidth it achieves (4 bytes per score read). Target: at most 25% of the scoring time on CPU, 5% on a GPU.
Timings taken on a shared machine are not comparable; say where a figure comes from.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.selection_vs_scoring", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument("--mode", choices=("per_layer", "global"), default="per_layer")
    parser.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="time the first calls")
    return parser.parse_args(argv)


def run(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from esa.ccdf import ccdf_curves
    from esa.scorescan import scan
    from esa.scorestats import location_table, score_statistics
    from esa.scoreselect import Selection, reduce_scores
    from esa.scoring import compute_scores
    from esa.selection import merge_candidates
    from esa.tensors import select_tensors

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=1, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(args.device).eval().requires_grad_(False)
    ids = torch.randint(0, args.vocab, (args.windows, args.seq_len), generator=torch.Generator().manual_seed(0))
    tensors = select_tensors(model)

    def now():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    if args.warmup:
        reduce_scores(compute_scores(model, tensors, ids, "grad_x_weight", batch_size=1), args.topk, summarize=True,
                      seed=0)
    t0 = now()
    scores = compute_scores(model, tensors, ids, "grad_x_weight", batch_size=1)
    t1 = now()
    reduced = reduce_scores(scores, args.topk, summarize=True, seed=0)
    infos = [t for t, _ in tensors]
    top = merge_candidates(infos, {n: r.top for n, r in reduced.items()}, args.topk, args.mode)
    bottom = merge_candidates(infos, {n: r.bottom for n, r in reduced.items()}, args.topk, args.mode, largest=False)
    t2 = now()
    selection = Selection(infos, top, bottom, {n: r.summary for n, r in reduced.items()})
    score_statistics(selection, args.topk)
    location_table(selection)
    ccdf_curves(selection)
    t3 = now()
    for score in scores.scores.values():  # the one read of every buffer on its own: its achieved bandwidth
        scan(score, shift=0.0, nonzero_min=True)
    t4 = now()
    n_scores = sum(score.numel() for score in scores.scores.values())
    return {"parameters": sum(p.numel() for p in model.parameters()), "device": args.device, "mode": args.mode,
            "tokens": args.windows * args.seq_len, "scoring_s": t1 - t0, "selection_s": t2 - t1,
            "statistics_s": t3 - t2, "selection_and_statistics_s": t3 - t1, "ratio": (t3 - t1) / (t1 - t0),
            "warmup": args.warmup, "threads": torch.get_num_threads(), "scan_s": t4 - t3,
            "scan_GB_per_s": 4 * n_scores / (t4 - t3) / 1e9}


def main(argv: list[str] | None = None) -> int:
    result = run(_parse(argv))
    print(f"{result['parameters']:,} parameters on {result['device']}, {result['tokens']} tokens, {result['mode']}: "
          f"scoring {result['scoring_s']:.2f} s, selection + statistics {result['selection_and_statistics_s']:.2f} s "
          f"(selection {result['selection_s']:.2f} s, statistics {result['statistics_s']:.2f} s): "
          f"{result['ratio']:.0%} of scoring; the scan of every buffer alone {result['scan_s']:.2f} s "
          f"({result['scan_GB_per_s']:.1f} GB/s)")
    out_dir = Path(__file__).resolve().parent / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"selection_vs_scoring_{result['device'].split(':')[0]}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
