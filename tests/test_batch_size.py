"""Batch size by plan: without --batch-size every command takes the largest batch the plan says fits the device
(8 on CPU), records it in config.json, and a rerun with the same flags is the same configuration."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import esa.modeling
import esa.planning
from esa.cli.main import app
from esa.config import BaselineConfig, DataConfig, ModelConfig, SelectionConfig
from esa.planning import HEADROOM, CPU_BATCH_SIZE, plan_command, planned_batch_size, with_planned_batch_size

SEL = SelectionConfig(metric="grad_x_weight")


def _data(**kw) -> DataConfig:
    return DataConfig(seq_len=64, **kw)


def _peak(batch: int, command: str = "profile") -> int:
    """The plan's peak at a forced batch size (no device limit)."""
    p, _, _ = plan_command(ModelConfig(), SEL, command=command, seq_len=64, batch_size=batch, device_memory=1 << 50)
    return p.peak_bytes


def test_on_cpu_the_batch_size_is_eight_and_a_given_one_is_kept():
    data = _data()
    assert with_planned_batch_size(ModelConfig(device="cpu"), SEL, data, command="profile").batch_size \
        == CPU_BATCH_SIZE == 8
    assert data.batch_size is None  # the caller's configuration is not changed
    given = _data(batch_size=3)
    assert with_planned_batch_size(ModelConfig(device="cpu"), SEL, given, command="profile") is given
    if not torch.cuda.is_available():
        assert planned_batch_size(ModelConfig(device="auto"), SEL, _data(), command="baseline") == 8


@pytest.mark.parametrize("command", ["profile", "baseline"])
def test_the_planned_batch_is_the_largest_that_fits_and_shrinks_with_the_memory(command):
    """Memory just above the plan's peak at batch b (and below b + 1) gives b; less memory gives less."""
    for b in (5, 2):
        memory = math.ceil(_peak(b, command) / HEADROOM) + 1
        assert _peak(b + 1, command) > memory * HEADROOM  # the premise: b + 1 does not fit
        assert planned_batch_size(ModelConfig(), SEL, _data(), command=command, device_memory=memory) == b


def test_esa_plan_reports_the_same_batch_size():
    memory = math.ceil(_peak(4) / HEADROOM) + 1
    result = CliRunner().invoke(app, ["plan", "--command", "profile", "--seq-len", "64", "--device-memory",
                                      str(memory), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["batch_size"] == 4
    assert planned_batch_size(ModelConfig(), SEL, _data(), command="profile", device_memory=memory) == 4


def test_on_a_faked_gpu_the_batch_comes_from_its_total_memory(monkeypatch):
    memory = math.ceil(_peak(3) / HEADROOM) + 1
    monkeypatch.setattr(esa.modeling, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(esa.planning, "device_total_memory", lambda device: memory)
    assert with_planned_batch_size(ModelConfig(), SEL, _data(), command="profile").batch_size == 3


def test_a_run_without_batch_size_records_it_and_a_rerun_is_the_same_configuration(tmp_path):
    from esa.commands.baseline import run_baseline
    from esa.commands.run import RunbookConfig, phase_configs, resolve, same_finished_run

    out = tmp_path / "run"
    cfg = resolve(RunbookConfig(model=ModelConfig(device="cpu"), data=DataConfig(max_samples=2), out_dir=str(out)))
    assert cfg.data.batch_size == 8
    baseline = BaselineConfig(model=ModelConfig(device="cpu"), data=DataConfig(max_samples=2),
                              out_dir=str(out / "baseline"))
    run_baseline(baseline)  # as `esa baseline` without --batch-size
    assert json.loads((out / "baseline" / "config.json").read_text())["data"]["batch_size"] == 8
    # the same flags: recognised as the finished baseline
    again = resolve(RunbookConfig(model=ModelConfig(device="cpu"), data=DataConfig(max_samples=2), out_dir=str(out)))
    assert same_finished_run(out / "baseline", phase_configs(again)["baseline"])
    other = resolve(RunbookConfig(model=ModelConfig(device="cpu"), data=DataConfig(max_samples=2, batch_size=2),
                                  out_dir=str(out)))
    assert not same_finished_run(out / "baseline", phase_configs(other)["baseline"])


def test_cli_help_states_the_default():
    result = CliRunner().invoke(app, ["baseline", "--help"], env={"COLUMNS": "200"})
    assert "the largest that fits the device by the plan; 8 on CPU" in " ".join(result.output.split())
