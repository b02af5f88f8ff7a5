"""``python -m bench.device_map_check``: a model split across devices with ``--device-map``, checked end to end.

On a CUDA machine: a small random Llama (saved with the embedded model's tokenizer) is run through ``esa baseline``
and ``esa perturb`` twice — on one GPU, and split with ``--device-map auto --max-memory 0=<half the weights>,
cpu=4GiB`` so that accelerate keeps part of the weights on the GPU and offloads the rest to CPU memory — and the
results are compared: per-window NLL (bitwise equal expected: the GPU computes both), and each perturb trial's
mean NLL. ``esa profile --metric grad_x_weight`` on the split must be refused in one line (exit 2). The perturb
selection is ``--metric magnitude`` (no gradient, so the offloaded split may select).

``--cpu`` runs the same steps on CPU with an all-``cpu`` map (``--max-memory cpu=4GiB``): the plumbing only, for
tests/test_device_map.py. Writes ``OUT/summary.json`` and prints it; exit 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

#: esa's own README as the text: the embedded corpus takes seconds to assemble in every one of the five commands
TEXT = Path(__file__).resolve().parents[1] / "README.md"
FAST = ["--text-file", TEXT, "--seq-len", "64", "--max-samples", "8", "--batch-size", "4"]
PERTURB = ["--metric", "magnitude", "--mode", "global", "--topk", "20", "--perturb", "zero", "--seeds", "0",
           "--control-sets", "3", "--n-bootstrap", "100"]


def make_model(path: Path, layers: int = 4, hidden: int = 256) -> int:
    """A random Llama in ``path`` (float32, seeded) with the embedded tokenizer; returns its weight bytes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from esa.tiny import ASSETS_DIR

    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def esa(*args: object) -> subprocess.CompletedProcess:
    env = dict(os.environ, ESA_PROGRESS="0", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "esa", *map(str, args)], env=env, capture_output=True, text=True)


def window_nll(run_dir: Path) -> list[float]:
    with open(run_dir / "window_nll.csv", newline="") as f:
        return [float(r["nll_sum"]) for r in csv.DictReader(f)]


def trial_nll(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    return {r["trial_id"]: r["mean_nll"] for r in rows}


def check(out: Path, cpu: bool) -> dict:
    model = out / "model"
    weight_bytes = make_model(model)
    one = ["--device", "cpu"] if cpu else ["--device", "cuda"]
    gpu_share = max(1, weight_bytes // 2 // 1000)
    split = ["--device-map", "auto", "--max-memory", "cpu=4GiB" if cpu else f"0={gpu_share}KB,cpu=4GiB"]
    summary: dict = {"device": "cpu" if cpu else "cuda", "weight_bytes": weight_bytes, "split_flags": split,
                     "checks": {}}
    for name, flags in (("one", one), ("split", split)):
        for command, extra in (("baseline", []), ("perturb", PERTURB)):
            proc = esa(command, "--model", model, *FAST, *extra, *flags, "--out-dir", out / name / command)
            summary[f"{name}_{command}_exit"] = proc.returncode
            if proc.returncode:
                summary[f"{name}_{command}_error"] = (proc.stderr or proc.stdout).strip()[-2000:]
    manifest = out / "split" / "baseline" / "experiment_manifest.json"
    if manifest.exists():
        summary["split_placement"] = {k: v for k, v in json.loads(manifest.read_text())["model"].items()
                                      if k in ("device", "device_map", "devices", "offloaded", "modules_per_device")}
    compare(out, summary)
    refused = esa("profile", "--model", model, *FAST, "--seeds", "0", *split, "--out-dir", out / "split" / "profile")
    summary["profile_on_split"] = {"exit": refused.returncode, "stderr": refused.stderr.strip()[-500:]}
    offloaded = bool(summary.get("split_placement", {}).get("offloaded"))
    summary["checks"]["gradient metric refused iff offloaded"] = (refused.returncode == 2) == offloaded
    if not cpu:
        summary["checks"]["split offloads part of the weights"] = offloaded
    summary["ok"] = all(summary["checks"].values())
    return summary


def compare(out: Path, summary: dict) -> None:
    """The one-device runs against the split ones, into ``summary`` (its ``*_exit`` entries say which ran)."""
    ok = all(summary[f"{n}_{c}_exit"] == 0 for n in ("one", "split") for c in ("baseline", "perturb"))
    summary["checks"]["all commands ran"] = ok
    if ok:
        a, b = window_nll(out / "one" / "baseline"), window_nll(out / "split" / "baseline")
        summary["baseline_max_abs_diff"] = max(abs(x - y) for x, y in zip(a, b))
        summary["checks"]["baseline window NLL identical"] = a == b
        ta, tb = trial_nll(out / "one" / "perturb"), trial_nll(out / "split" / "perturb")
        summary["perturb_trials"] = {k: [ta[k], tb.get(k)] for k in ta}
        summary["checks"]["perturb trials identical"] = ta == tb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.device_map_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("bench/out/device_map_check"))
    parser.add_argument("--cpu", action="store_true", help="the CPU dry run (an all-cpu device map)")
    args = parser.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("device_map_check: no CUDA device; use --cpu for the dry run", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = check(args.out_dir, args.cpu)
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
