"""Data parallelism under torchrun: a 2-process gloo run equals the 1-process run, and one failing rank stops it.

The 2-process runs are launched with ``python -m torch.distributed.run`` (torchrun) on tests/distributed_driver.py,
which runs several ``esa`` commands in one process group; the 1-process references run here, in this process,
with one thread like each rank. 9 windows in batches of 2 make 5 batches, the last one short, shared out 2 + 3.
The text is esa's own module docstrings (the embedded corpus takes seconds to assemble; the model is embedded).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from esa import distributed
from esa.cli.main import app
from esa.errors import EsaError

DRIVER = Path(__file__).resolve().parent / "distributed_driver.py"
RUNNER = Path(__file__).resolve().parents[1] / "phase1_runner_enhanced.py"
FAST = ["--seq-len", "64", "--max-samples", "9", "--batch-size", "2", "--device", "cpu", "--text-file"]
PROFILES = {
    "gxw": ["--metric", "grad_x_weight", "--mode", "per_layer", "--topk", "20", "--save-scores"],
    "hutch": ["--metric", "hutchinson_diag", "--mode", "global", "--topk", "20", "--hutchinson-probes", "2",
              "--save-scores"],
}
SCORE_RTOL = 1e-5


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """2 processes on the driver, or (first argument ``--runner``) on phase1_runner_enhanced.py."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ESA_PROGRESS": "0"}
    script = RUNNER if args[0] == "--runner" else DRIVER
    args = args[1:] if args[0] == "--runner" else args
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    import esa.commands.profile
    import esa.distributed
    import esa.evaluate
    import esa.scoring
    import esa.trials

    path = tmp_path_factory.mktemp("text") / "docstrings.txt"
    path.write_text("\n\n".join(m.__doc__ for m in (esa.scoring, esa.evaluate, esa.trials, esa.commands.profile,
                                                      esa.distributed)))
    return str(path)


def errors(result: subprocess.CompletedProcess) -> str:
    """The ranks' error lines and tracebacks, without torchrun's summary."""
    return result.stderr.split("ChildFailedError")[0][-6000:]


def perturb_args(profile_dir: Path, out: Path, text: str) -> list[str]:
    return ["perturb", "--from-profile", str(profile_dir), "--perturb", "gauss_noise", "--perturb-scale", "2",
            "--controls", "random_k,bottom_k", "--control-sets", "2", "--seeds", "0", "--n-bootstrap", "100",
            *FAST, text, "--out-dir", str(out)]


def interrupted_copy(finished: Path, target: Path, keep: int) -> None:
    """``finished`` as if it had been interrupted after its first ``keep`` trials.jsonl records, at ``target``."""
    shutil.copytree(finished, target)
    lines = (target / "trials.jsonl").read_text().splitlines(keepends=True)
    (target / "trials.jsonl").write_text("".join(lines[:keep]))
    for name in ("experiment_manifest.json", "results.json"):
        (target / name).unlink()
    config = json.loads((target / "config.json").read_text())
    config["out_dir"] = str(target)
    (target / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text):
    """(1-process directory, 2-process directory), each holding baseline, gxw, hutch, perturb and resume runs."""
    root = tmp_path_factory.mktemp("dist")
    one, two = root / "one", root / "two"
    commands = [["baseline", *FAST, text, "--out-dir", "{}/baseline"]]
    commands += [["profile", *args, *FAST, text, "--out-dir", "{}/" + name] for name, args in PROFILES.items()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for argv in commands:
            result = CliRunner().invoke(app, [a.format(one) for a in argv])
            assert result.exit_code == 0, result.output
        result = CliRunner().invoke(app, perturb_args(one / "gxw", one / "perturb", text))
        assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(threads)
    interrupted_copy(one / "perturb", two / "resume", keep=2)  # the baseline and the first trial are done
    plan = [[a.format(two) for a in argv] for argv in commands]
    plan += [perturb_args(one / "gxw", two / "perturb", text), perturb_args(one / "gxw", two / "resume", text)]
    (root / "plan.json").write_text(json.dumps(plan))
    out = torchrun("commands", str(root / "plan.json"))
    assert out.returncode == 0, errors(out)
    return one, two


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def trials(path: Path) -> dict[str, dict]:
    return {r["trial_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_baseline_equals_one_process(runs):
    one, two = runs
    assert (two / "baseline" / "window_nll.csv").read_bytes() == (one / "baseline" / "window_nll.csv").read_bytes()
    assert json.loads((two / "baseline" / "metrics.json").read_text()) == \
        json.loads((one / "baseline" / "metrics.json").read_text())
    manifest = json.loads((two / "baseline" / "experiment_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["distributed"] == {"world_size": 2, "backend": "gloo"}


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_equals_one_process(runs, name):
    one, two = runs
    ref, got = load_file(one / name / "scores.safetensors"), load_file(two / name / "scores.safetensors")
    assert ref.keys() == got.keys()
    for tensor in ref:
        assert ref[tensor].abs().sum() > 0, tensor
        torch.testing.assert_close(got[tensor], ref[tensor], rtol=SCORE_RTOL, atol=SCORE_RTOL * ref[tensor].abs().max())
    top_ref = {(r["tensor"], int(r["flat_index"])) for r in rows(one / name / "top_weights.csv")}
    top_got = {(r["tensor"], int(r["flat_index"])) for r in rows(two / name / "top_weights.csv")}
    assert len(top_got) == len(top_ref)
    # Weights may swap places only where their scores tie within tolerance with a kept weight's.
    per_layer = "per_layer" in PROFILES[name]  # the boundary is per tensor, else model-wide
    def kept(tensor: str) -> float:
        return min(float(ref[t].reshape(-1)[i]) for t, i in top_ref if t == tensor or not per_layer)

    for t, i in top_ref ^ top_got:
        assert abs(float(ref[t].reshape(-1)[i]) - kept(t)) <= SCORE_RTOL * kept(t), (t, i)


@pytest.mark.parametrize("run", ["perturb", "resume"])
def test_perturb_equals_one_process(runs, run):
    """A fresh 2-process perturb run, and one resumed from a 1-process run's trials.jsonl, give the 1-process
    trials (per-window NLL of every trial, bit for bit) and statistics."""
    one, two = runs
    ref, got = trials(one / "perturb" / "trials.jsonl"), trials(two / run / "trials.jsonl")
    assert list(got) == list(ref)  # every trial once, in the same order
    assert len(ref) == 5  # the baseline, super, bottom_k and two random_k sets
    for trial_id, record in ref.items():
        for key in ("window_nll", "correct", "set_hash", "n_weights"):
            assert got[trial_id].get(key) == record.get(key), (trial_id, key)
    assert json.loads((two / run / "results.json").read_text()) == \
        json.loads((one / "perturb" / "results.json").read_text())


def test_runbook_under_torchrun_equals_one_process(runs, text, tmp_path):
    """``torchrun phase1_runner_enhanced.py`` (= ``torchrun -m esa run``): every phase and the report written once,
    by rank 0, with the 1-process baseline and top-k."""
    one, _ = runs
    out = tmp_path / "run"
    result = torchrun("--runner", *PROFILES["gxw"][:-1], *FAST, text, "--perturb", "zero", "--controls", "random_k",
                      "--seeds", "0", "--out-dir", str(out))
    assert result.returncode == 0, errors(result)
    assert "report in" in result.stdout and result.stdout.count("results in") == 3  # rank 0 alone prints
    assert (out / "baseline" / "window_nll.csv").read_bytes() == (one / "baseline" / "window_nll.csv").read_bytes()
    top = lambda d: {(r["tensor"], r["flat_index"]) for r in rows(d / "top_weights.csv")}  # noqa: E731
    assert top(out / "profile") == top(one / "gxw")
    assert len(trials(out / "perturb" / "trials.jsonl")) == 1 + 1 + 39  # baseline, super, the default control sets
    assert (out / "report" / "report.html").exists()


def test_a_failing_rank_stops_the_run_with_its_error(tmp_path, text):
    out = tmp_path / "run"
    result = torchrun("fail", "1", "baseline", *FAST, text, "--out-dir", str(out))
    assert result.returncode != 0
    assert "error: rank 1/2: injected failure on rank 1" in result.stderr
    assert not (out / "experiment_manifest.json").exists() and not (out / "metrics.json").exists()


def test_shards_are_contiguous_blocks_of_whole_batches(monkeypatch):
    for n in (1, 2, 3, 4):
        for n_batches in range(10):
            blocks = []
            for r in range(n):
                monkeypatch.setattr(distributed, "world_size", lambda n=n: n)
                monkeypatch.setattr(distributed, "rank", lambda r=r: r)
                blocks.append(distributed.shard(n_batches))
            assert [b for block in blocks for b in block] == list(range(n_batches))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_commands_that_are_not_data_parallel_are_refused(monkeypatch):
    monkeypatch.setitem(distributed._state, "active", True)
    for argv in (["baseline", "--max-samples", "4"], ["run"], ["--help"]):
        distributed.check_command(argv)
    with pytest.raises(EsaError, match="esa superweights is not supported under torchrun"):
        distributed.check_command(["superweights", "--model", "x"])


def test_one_process_is_the_default():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard(5) == range(5) and distributed.rank_label() == ""
