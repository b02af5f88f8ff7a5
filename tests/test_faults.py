"""Faults a long run meets: a full disk, an unwritable --out-dir, Ctrl-C mid-run, and weights holding NaN/Inf."""

import errno
import os

import pytest
import torch
from typer.testing import CliRunner

from esa.cli.main import app
from esa.runio import MANIFEST, is_finished
from helpers import random_model, save_model

runner = CliRunner()
TEXT = os.path.join(os.path.dirname(os.__file__), "this.py")  # a small text every Python has: loads in no time
FAST = ["--seq-len", "32", "--max-samples", "4", "--batch-size", "4", "--text-file", TEXT]
PERTURB = ["--metric", "magnitude", "--mode", "global", "--topk", "3", "--seeds", "0,1", "--n-bootstrap", "200"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers import save_random_model

    return save_random_model("llama", tmp_path_factory.mktemp("m") / "model")


def _disk_full_after(monkeypatch, n_ok: int) -> None:
    """Every fsync after the first ``n_ok`` fails as a full disk would."""
    calls = {"n": 0}
    real = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _leftovers(folder):
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("command", ["baseline", "profile", "perturb"])
def test_full_disk_is_one_line_leaves_no_partial_file_and_no_finished_run(model_dir, tmp_path, monkeypatch, command):
    out = tmp_path / "run"
    extra = {"baseline": [], "profile": ["--metric", "magnitude", "--topk", "3"], "perturb": PERTURB}[command]
    _disk_full_after(monkeypatch, 2)
    result = runner.invoke(app, [command, "--model", str(model_dir), *FAST, *extra, "--out-dir", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0] and "No space left on device" in lines[0], result.output
    assert not is_finished(out) and not (out / MANIFEST).exists()
    assert _leftovers(tmp_path) == []


def test_full_disk_while_writing_a_report(model_dir, tmp_path, monkeypatch):
    from esa.errors import EsaError
    from esa.reporting.build import write_report

    runs = tmp_path / "runs"
    assert runner.invoke(app, ["baseline", "--model", str(model_dir), *FAST, "--out-dir", str(runs / "b")]).exit_code == 0
    _disk_full_after(monkeypatch, 1)
    with pytest.raises(EsaError, match="cannot write"):
        write_report([runs], tmp_path / "rep")
    assert not (tmp_path / "rep" / "report.html").exists() and _leftovers(tmp_path) == []


def test_unwritable_out_dir_fails_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    loaded = []
    monkeypatch.setattr("esa.session.load_model", lambda *a, **k: loaded.append(1))
    for args in (["baseline", "--out-dir"], ["profile", "--out-dir"], ["perturb", "--out-dir"], ["report", "x", "--out"]):
        result = runner.invoke(app, [*args, str(blocker / "sub")])
        assert result.exit_code == 2 and "is a file, not a directory" in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1
    assert loaded == []


def test_weights_holding_nan_are_refused_at_baseline_with_the_tensor_named(tmp_path):
    model = random_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
        model.model.layers[1].mlp.down_proj.weight[4, 5] = float("inf")
    broken = save_model(model, tmp_path / "broken")
    result = runner.invoke(app, ["baseline", "--model", str(broken), *FAST, "--out-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "model.layers.1.mlp.down_proj.weight holds 2 NaN/Inf" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "run" / MANIFEST).exists()


def _interrupt_on_call(monkeypatch, target: str, n: int) -> None:
    """The ``n``-th call of ``target`` raises KeyboardInterrupt (as Ctrl-C would, mid-run)."""
    module, name = target.rsplit(".", 1)
    real = getattr(__import__(module, fromlist=[name]), name)
    calls = {"n": 0}

    def hooked(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(target, hooked)


def _session(model_dir, data):
    from esa.config import ModelConfig
    from esa.session import open_session

    return open_session(ModelConfig(model=str(model_dir)), data)


def test_ctrl_c_during_perturb_restores_the_weights_and_the_run_resumes(model_dir, tmp_path, monkeypatch):
    from esa.config import DataConfig, PerturbConfig, SelectionConfig
    from esa.fingerprint import model_fingerprint
    from esa.runio import read_json, read_jsonl
    from esa.commands.perturb import run_perturb

    data = DataConfig(seq_len=32, max_samples=4, batch_size=4, text_file=TEXT)
    config = PerturbConfig(data=data, selection=SelectionConfig(metric="magnitude", mode="global", topk=3),
                           seeds=[0, 1], n_bootstrap=200, out_dir=str(tmp_path / "run"))
    session = _session(model_dir, data)
    before = model_fingerprint(session.loaded.model)
    # Interrupt the 4th evaluation: the baseline and two evaluated trials are done (trials that reuse an earlier
    # identical set's result need no evaluation), the third is inside its perturbation.
    _interrupt_on_call(monkeypatch, "esa.commands.perturb.evaluate", 4)
    with pytest.raises(KeyboardInterrupt):
        run_perturb(config, session=session)
    assert model_fingerprint(session.loaded.model) == before  # restored on the way out
    assert not is_finished(tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "trials.jsonl")
    done = [r["trial_id"] for r in records]
    assert len([r for r in records if "reused_from" not in r]) == 3
    monkeypatch.undo()
    run_perturb(config, session=session)  # the same command again resumes
    assert is_finished(tmp_path / "run") and read_json(tmp_path / "run" / MANIFEST)["resumed"] is True
    assert [r["trial_id"] for r in read_jsonl(tmp_path / "run" / "trials.jsonl")][:len(done)] == done
    assert model_fingerprint(session.loaded.model) == before


def test_ctrl_c_during_profile_leaves_it_clearly_unfinished(model_dir, tmp_path, monkeypatch):
    from esa.fingerprint import model_fingerprint

    out = tmp_path / "run"
    hooked_session = {}
    import esa.commands.profile as profile

    real_open = profile.open_for_selection

    def remember(*a, **k):
        hooked_session["s"] = real_open(*a, **k)
        return hooked_session["s"]

    monkeypatch.setattr(profile, "open_for_selection", remember)
    _interrupt_on_call(monkeypatch, "esa.commands.profile.write_weights", 2)  # mid-way through writing the results
    result = runner.invoke(app, ["profile", "--model", str(model_dir), *FAST, "--metric", "grad_x_weight", "--topk",
                                 "3", "--out-dir", str(out)])
    assert result.exit_code == 130 and "interrupted" in result.output
    model = hooked_session["s"].loaded.model
    assert all(p.grad is None for p in model.parameters())
    assert not is_finished(out) and (out / "top_weights.csv").exists()
    fingerprint = model_fingerprint(model)
    monkeypatch.undo()
    # Unfinished: the same command runs again without --overwrite, and a report leaves the half run out.
    again = runner.invoke(app, ["profile", "--model", str(model_dir), *FAST, "--metric", "grad_x_weight", "--topk",
                                "3", "--out-dir", str(out)])
    assert again.exit_code == 0 and is_finished(out)
    assert fingerprint == model_fingerprint(model)


def test_append_after_a_torn_line_starts_a_clean_line(tmp_path):
    """A run killed in the middle of an append leaves a line without its newline; the next append (a resume)
    must not glue its record onto it."""
    from esa.runio import append_jsonl, read_jsonl

    path = tmp_path / "trials.jsonl"
    append_jsonl(path, {"trial_id": "a"})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"trial_id": "b", "window_nl')  # torn by a kill
    append_jsonl(path, {"trial_id": "c"})
    assert [r["trial_id"] for r in read_jsonl(path)] == ["a", "c"]
