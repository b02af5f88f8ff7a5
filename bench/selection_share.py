"""Selection + statistics against scoring in a whole ``esa profile`` at the runbook's size (issue 14, point 7).

    python -m bench.selection_share                       # random-weight Llama-3.1-8B, bf16, on the GPU: runbook
                                                          # command 1 (grad_x_weight per_layer, 64 windows of 2048)
    python -m bench.selection_share --tiny --device cpu   # a dry run of this script (seconds)

:mod:`bench.selection_vs_scoring` measures one layer on one 128-token window, where selection and statistics are
a fixed cost per tensor that no amount of scoring amortises. This measures what a user pays in the runbook: one
untimed warm-up profile on one window (Triton compiles its kernels, CUDA loads its modules), then
:func:`esa.commands.profile.run_profile` on ``--windows`` windows, from its manifest's ``timings_s``: the score
phase (the scoring passes), the selection phase (selecting and summarising each group's scores: from the scores'
completion, after a device synchronisation, to the candidates on the host) and the statistics phase (the tail fits
in worker processes started before scoring, the location table, the CCDF). (The fourth session's figures in
``bench/RESULTS.md`` were taken when the manifest kept the selection inside the score phase, as
``scoring.selection_s``; they subtract it.) Target: selection + statistics at most 5% of scoring on a GPU.
Writes ``bench/out/selection_share_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.gpu_check import DEFAULT_CONFIG, WIKITEXT, load_architecture, random_model


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.selection_share", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="model config directory (config.json)")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--mode", choices=("per_layer", "global"), default="per_layer")
    parser.add_argument("--metric", default="grad_x_weight")
    parser.add_argument("--layers", type=int, default=None, help="layers to keep (default: all)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short windows: a dry run")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "out")
    return parser.parse_args(argv)


def run(args) -> dict:
    import torch

    from esa.commands.profile import run_profile
    from esa.config import DataConfig, ModelConfig, ProfileConfig, SelectionConfig
    from esa.progress import quiet
    from esa.session import Session
    from esa.windows import make_windows

    device = torch.device(args.device)
    config, described = load_architecture(args.config, args.tiny)
    if args.layers:
        config.num_hidden_layers = min(args.layers, config.num_hidden_layers)
    seq_len = 32 if args.tiny else args.seq_len
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    loaded, corpus, ids, wikitext, _ = random_model(config, described, device, dtype)
    model = loaded.model
    model_cfg = ModelConfig(model=described, dtype=str(dtype).removeprefix("torch."), device=str(device))
    selection = SelectionConfig(metric=args.metric, mode=args.mode, topk=100)

    def profile(n_windows: int, name: str) -> dict:
        windows = make_windows(ids, seq_len, max_samples=n_windows, seed=0, max_positions=loaded.max_positions)
        data = DataConfig(dataset="wikitext2" if wikitext else "embedded",
                          dataset_path=str(WIKITEXT) if wikitext else None, seq_len=seq_len, batch_size=1,
                          max_samples=n_windows)
        cfg = ProfileConfig(model=model_cfg, data=data, selection=selection, out_dir=str(args.out_dir / name),
                            overwrite=True)
        start = time.perf_counter()
        with quiet():
            run_profile(cfg, session=Session(loaded=loaded, corpus=corpus, windows=windows))
        wall = time.perf_counter() - start
        manifest = json.loads((args.out_dir / name / "experiment_manifest.json").read_text())
        return {"wall_s": wall, "windows": windows.n, "timings_s": manifest["timings_s"],
                "tensors": len(manifest["scoring"]["tensors"])}

    profile(1, "selection_share_warmup")
    timed = profile(args.windows, "selection_share_run")
    scoring, selection_s = timed["timings_s"]["score"], timed["timings_s"]["selection"]
    statistics = timed["timings_s"]["statistics"]
    return {"model": described, "layers": config.num_hidden_layers, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype), "metric": args.metric,
            "mode": args.mode, "windows": timed["windows"], "seq_len": seq_len, "tokens": timed["windows"] * seq_len,
            "tensors": timed["tensors"], "scoring_s": scoring, "selection_s": selection_s,
            "statistics_s": statistics, "selection_and_statistics_s": selection_s + statistics,
            "ratio": (selection_s + statistics) / scoring, "profile_wall_s": timed["wall_s"],
            "timings_s": timed["timings_s"]}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    r = run(args)
    print(f"{r['model']} ({r['layers']} layers, {r['parameters']:,} parameters, {r['tensors']} tensors) on "
          f"{r['device_name']}, {r['metric']} {r['mode']}, {r['windows']} windows of {r['seq_len']} tokens: scoring "
          f"{r['scoring_s']:.2f} s, selection {r['selection_s']:.3f} s, statistics {r['statistics_s']:.3f} s: "
          f"selection + statistics {r['ratio']:.1%} of scoring")
    name = f"selection_share_{r['device'].split(':')[0]}.json"
    (args.out_dir / name).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
