"""Peak host memory of profiling on the CPU, each scenario in a fresh process (peak RSS from getrusage).

    python -m bench.memory [--hidden 1024 --layers 8 --vocab 32000]

Scenarios on the same random-weight Llama (float32) and the same windows:
- ``load``: the model alone;
- ``forward_backward``: a plain forward + backward with every weight's gradient kept (what a naive scorer does);
- ``profile``: esa's grad_x_weight scoring (one fp32 score buffer per weight, gradients folded and freed as they
  arrive).
- ``naive_profile``: the same scores computed the obvious way, keeping every gradient until the step ends.
Expected: profile ≈ load + one fp32 copy of the weights (the scores) + activations + the largest gradient;
forward_backward ≈ load + one copy (all gradients) + activations; naive ≈ load + two copies + activations.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

SCENARIOS = ("load", "forward_backward", "profile", "naive_profile")


def child(scenario: str, hidden: int, layers: int, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                         max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, vocab, (2, 128), generator=torch.Generator().manual_seed(0))
    if scenario == "forward_backward":
        model.requires_grad_(True)
        for i in range(2):
            model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss.backward()
    elif scenario == "naive_profile":  # keep all gradients, then fold them into scores
        model.requires_grad_(True)
        scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
        for i in range(2):
            model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss.backward()
            for n, p in model.named_parameters():
                scores[n] += (p.grad * p.detach()).abs()
                p.grad = None
    elif scenario == "profile":
        from esa.scoring import compute_scores
        from esa.tensors import select_tensors

        compute_scores(model, select_tensors(model), ids, "grad_x_weight", batch_size=1)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"scenario": scenario, "peak_rss_mb": round(peak_mb), "params": n_params,
                      "weights_mb": round(n_params * 4 / 2**20)}))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--child", choices=SCENARIOS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.hidden, args.layers, args.vocab)
        return
    rows = []
    for scenario in SCENARIOS:
        out = subprocess.run([sys.executable, "-m", "bench.memory", "--child", scenario, "--hidden", str(args.hidden),
                              "--layers", str(args.layers), "--vocab", str(args.vocab)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    weights = rows[0]["weights_mb"]
    print(f"random Llama, {rows[0]['params']:,} parameters = {weights} MB in float32; 2 windows of 128 tokens, batch 1")
    print(f"{'scenario':<18}{'peak RSS (MB)':>15}{'− load (MB)':>14}{'in weight copies':>18}")
    for r in rows:
        extra = r["peak_rss_mb"] - rows[0]["peak_rss_mb"]
        print(f"{r['scenario']:<18}{r['peak_rss_mb']:>15}{extra:>14}{extra / weights:>18.2f}")


if __name__ == "__main__":
    main()
