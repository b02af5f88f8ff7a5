"""Data parallelism under torchrun: a 2-process gloo run equals the 1-process run, and one failing rank stops it.

The 2-process runs are launched with ``python -m torch.distributed.run`` (torchrun) on tests/distributed_driver.py,
which runs several ``esa`` commands in one process group (one launch per model); the 1-process references run
here, in this process, with one thread like each rank. 9 windows in batches of 2 make 5 batches, the last one
short, shared out 2 + 3. The text is esa's own module docstrings (the embedded corpus takes seconds to assemble).
Two models: the embedded one, and tests/test_moe.py's tiny random Mixtral (routed experts: act_mag sums each
expert's token norms over the ranks, and the routing of a batch must not depend on which rank evaluates it).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import esa
from esa import distributed
from esa.cli.main import app
from esa.errors import EsaError
from helpers import random_model, save_model
from test_moe import tiny_mixtral

DRIVER = Path(__file__).resolve().parent / "distributed_driver.py"
RUNNER = Path(__file__).resolve().parents[1] / "phase1_runner_enhanced.py"
FAST = ["--seq-len", "64", "--max-samples", "9", "--batch-size", "2", "--device", "cpu", "--text-file"]
PROFILES = {
    "gxw": ["--metric", "grad_x_weight", "--mode", "per_layer", "--topk", "20", "--save-scores"],
    "hutch": ["--metric", "hutchinson_diag", "--mode", "global", "--topk", "20", "--hutchinson-probes", "2",
              "--save-scores"],
}
# On the Mixtral, also act_mag per layer: per-expert token norms summed across ranks.
MIXTRAL_PROFILES = {**PROFILES, "act": ["--metric", "act_mag", "--mode", "per_layer", "--topk", "20",
                                        "--save-scores"]}
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


def perturb_args(profile_dir: Path, out: Path, text: str, model: Sequence[str] = ()) -> list[str]:
    return ["perturb", *model, "--from-profile", str(profile_dir), "--perturb", "gauss_noise", "--perturb-scale", "2",
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


def one_and_two(root: Path, text: str, model: Sequence[str], profiles: dict[str, list[str]], *,
                resume: bool) -> tuple[Path, Path]:
    """baseline, one profile per entry of ``profiles``, and perturb from the gxw profile, run with one process
    under ``root/one`` (here) and with two under ``root/two`` (one torchrun launch); with ``resume``, also a
    2-process perturb run resumed from the 1-process run's first two trials, in ``root/two/resume``."""
    one, two = root / "one", root / "two"
    commands = [["baseline", *model, *FAST, text, "--out-dir", "{}/baseline"]]
    commands += [["profile", *model, *args, *FAST, text, "--out-dir", "{}/" + name] for name, args in profiles.items()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for argv in [[a.format(one) for a in argv] for argv in commands] + [
                perturb_args(one / "gxw", one / "perturb", text, model)]:
            result = CliRunner().invoke(app, argv)
            assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(threads)
    plan = [[a.format(two) for a in argv] for argv in commands] + [perturb_args(one / "gxw", two / "perturb", text,
                                                                                model)]
    if resume:
        interrupted_copy(one / "perturb", two / "resume", keep=2)  # the baseline and the first trial are done
        plan.append(perturb_args(one / "gxw", two / "resume", text, model))
    (root / "plan.json").write_text(json.dumps(plan))
    out = torchrun("commands", str(root / "plan.json"))
    assert out.returncode == 0, errors(out)
    return one, two


@pytest.fixture(scope="module")
def embedded_runs(tmp_path_factory, text):
    """(1-process directory, 2-process directory) of the embedded model, with a resumed perturb run."""
    return one_and_two(tmp_path_factory.mktemp("dist"), text, (), PROFILES, resume=True)


@pytest.fixture(scope="module")
def mixtral_runs(tmp_path_factory, text):
    """(1-process directory, 2-process directory) of the tiny random Mixtral (with the embedded tokenizer)."""
    from transformers import AutoTokenizer

    from esa.tiny import ASSETS_DIR

    root = tmp_path_factory.mktemp("mixtral")
    model = save_model(tiny_mixtral(len(AutoTokenizer.from_pretrained(ASSETS_DIR))), root / "model")
    return one_and_two(root, text, ["--model", str(model)], MIXTRAL_PROFILES, resume=False)


def runs_of(request, model: str) -> tuple[Path, Path]:
    return request.getfixturevalue(f"{model}_runs")


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def trials(path: Path) -> dict[str, dict]:
    return {r["trial_id"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.parametrize("model", ["embedded", "mixtral"])
def test_baseline_equals_one_process(request, model):
    one, two = runs_of(request, model)
    assert (two / "baseline" / "window_nll.csv").read_bytes() == (one / "baseline" / "window_nll.csv").read_bytes()
    assert json.loads((two / "baseline" / "metrics.json").read_text()) == \
        json.loads((one / "baseline" / "metrics.json").read_text())
    manifest = json.loads((two / "baseline" / "experiment_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["distributed"] == {"world_size": 2, "backend": "gloo"}


@pytest.mark.parametrize("model,name", [("embedded", n) for n in sorted(PROFILES)] +
                         [("mixtral", n) for n in sorted(MIXTRAL_PROFILES)])
def test_profile_equals_one_process(request, model, name):
    one, two = runs_of(request, model)
    ref, got = load_file(one / name / "scores.safetensors"), load_file(two / name / "scores.safetensors")
    assert ref.keys() == got.keys()
    if model == "mixtral":  # the routed expert stacks and the router are among the compared scores
        assert {f"model.layers.1.mlp.{t}" for t in ("experts.gate_up_proj", "experts.down_proj", "gate.weight")} <= \
            ref.keys()
    for tensor in ref:
        assert ref[tensor].abs().sum() > 0, tensor
        torch.testing.assert_close(got[tensor], ref[tensor], rtol=SCORE_RTOL, atol=SCORE_RTOL * ref[tensor].abs().max())
    top_ref = {(r["tensor"], int(r["flat_index"])) for r in rows(one / name / "top_weights.csv")}
    top_got = {(r["tensor"], int(r["flat_index"])) for r in rows(two / name / "top_weights.csv")}
    assert len(top_got) == len(top_ref)
    # Weights may swap places only where their scores tie within tolerance with a kept weight's.
    per_layer = "per_layer" in MIXTRAL_PROFILES[name]  # the boundary is per tensor, else model-wide
    def kept(tensor: str) -> float:
        return min(float(ref[t].reshape(-1)[i]) for t, i in top_ref if t == tensor or not per_layer)

    for t, i in top_ref ^ top_got:
        assert abs(float(ref[t].reshape(-1)[i]) - kept(t)) <= SCORE_RTOL * kept(t), (t, i)


@pytest.mark.parametrize("model,run", [("embedded", "perturb"), ("embedded", "resume"), ("mixtral", "perturb")])
def test_perturb_equals_one_process(request, model, run):
    """A fresh 2-process perturb run, and one resumed from a 1-process run's trials.jsonl, give the 1-process
    trials (per-window NLL of every trial, bit for bit) and statistics."""
    one, two = runs_of(request, model)
    ref, got = trials(one / "perturb" / "trials.jsonl"), trials(two / run / "trials.jsonl")
    assert list(got) == list(ref)  # every trial once, in the same order
    assert len(ref) == 5  # the baseline, super, bottom_k and two random_k sets
    for trial_id, record in ref.items():
        for key in ("window_nll", "correct", "set_hash", "n_weights"):
            assert got[trial_id].get(key) == record.get(key), (trial_id, key)
    assert json.loads((two / run / "results.json").read_text()) == \
        json.loads((one / "perturb" / "results.json").read_text())


def test_runbook_under_torchrun_equals_one_process(embedded_runs, text, tmp_path):
    """``torchrun phase1_runner_enhanced.py`` (= ``torchrun -m esa run``): every phase and the report written once,
    by rank 0, with the 1-process baseline and top-k."""
    one, _ = embedded_runs
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
    assert "error: rank 0/2: stopped because another rank failed" in result.stderr
    # One line per rank, no traceback through esa (torchrun's own launcher traceback follows them).
    assert str(Path(esa.__file__).parent) + os.sep not in result.stderr
    assert not out.exists() or not any(out.rglob("*"))  # nothing written, not even a partial file


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


def test_hutchinson_probes_follow_the_global_batch_not_the_rank(monkeypatch):
    """Seeds depend on the global batch index, never on the rank: with 4 batches shared out over 3 ranks
    (1 + 1 + 2, a split the 2-process runs do not make), each rank's sums of z ⊙ Hz over its own batches (taken
    where they would be all_reduced) add up to the 1-process sums, for every scored tensor of a tiny Llama."""
    from esa.scoring import compute_scores
    from esa.tensors import select_tensors

    model = random_model("llama")
    tensors = select_tensors(model, include=["*layers.0.*"])
    windows = torch.randint(0, model.config.vocab_size, (7, 8), generator=torch.Generator().manual_seed(0))

    def sums(n: int, r: int) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        monkeypatch.setattr(distributed, "world_size", lambda: n)
        monkeypatch.setattr(distributed, "rank", lambda: r)
        monkeypatch.setattr(distributed, "all_reduce_sum_", lambda t: seen.append(t.clone()) or t)
        compute_scores(model, tensors, windows, "hutchinson_diag", batch_size=2, hutchinson_probes=1, seed=3)
        return seen

    whole = sums(1, 0)
    parts = [sums(3, r) for r in range(3)]
    assert len(whole) == len(tensors) and all(len(p) == len(whole) for p in parts)
    for i, ref in enumerate(whole):
        assert all(p[i].abs().sum() > 0 for p in parts)  # every rank has batches to fold
        torch.testing.assert_close(sum(p[i] for p in parts), ref, rtol=SCORE_RTOL, atol=SCORE_RTOL * ref.abs().max())


def test_commands_that_are_not_data_parallel_are_refused(monkeypatch):
    monkeypatch.setitem(distributed._state, "active", True)
    for argv in (["baseline", "--max-samples", "4"], ["run"], ["--help"]):
        distributed.check_command(argv)
    with pytest.raises(EsaError, match="esa superweights is not supported under torchrun"):
        distributed.check_command(["superweights", "--model", "x"])


def test_one_process_is_the_default():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard(5) == range(5) and distributed.rank_label() == ""
