"""Options declared once (esa/options.py; cli/options.py makes them Typer options), flags as --flag/--no-flag,
`esa run` taking every phase's options, and one validation of every configuration (esa.config.validate)."""

import ast
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import typer
from typer.testing import CliRunner

from esa.cli.main import app, runbook_app
from esa.config import (HESSIAN_BUDGET, DataConfig, ModelConfig, PerturbConfig, ProfileConfig, RunbookConfig,
                        SelectionConfig, ValidateConfig, resolve_attention, validate)
from esa.errors import EsaError
from helpers import REPO

runner = CliRunner()
WIDE = {"COLUMNS": "250"}
#: Options of a phase command that `esa run` leaves out, and why (it chains the phases itself).
PHASE_ONLY = {"--from-profile": "perturb", "--weights": "perturb", "--out": "report"}


# typer 0.29 vendors click (typer._click), so commands and options are recognised by their attributes.
def commands(group=None, prefix: tuple[str, ...] = ()):
    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def options(cmd) -> list:
    return [p for p in cmd.params if p.param_type_name == "option"]


def flags(cmd) -> set[str]:
    return {f for p in options(cmd) for f in (*p.opts, *p.secondary_opts) if f.startswith("--") and f != "--help"}


def help_text(*args) -> str:
    result = runner.invoke(app, [*args, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return result.output


def test_esa_run_takes_every_option_of_the_phases_it_runs():
    cmds = dict(commands())
    run_flags = flags(cmds[("run",)])
    assert len(run_flags) > 40  # every option of profile and perturb, and the --no- forms of flags
    text = help_text("run")
    for phase in ("baseline", "profile", "perturb", "report"):
        missing = flags(cmds[(phase,)]) - run_flags - set(PHASE_ONLY)
        assert not missing, f"esa run lacks these options of esa {phase}: {sorted(missing)}"
    assert {f for f in PHASE_ONLY if f in run_flags} == set()
    for flag in run_flags:
        assert flag in text, flag
    # the runbook's own entry point is the same command
    assert flags(typer.main.get_command(runbook_app)) == run_flags


def test_no_help_shows_a_bool_placeholder_and_flags_come_in_pairs():
    assert "<bool>" not in help_text()
    for path, cmd in commands():
        text = help_text(*path)
        assert "<bool>" not in text, f"esa {' '.join(path)} --help"
        assert "--help" in text
        for p in options(cmd):
            if p.is_flag and p.name != "help":
                assert p.secondary_opts, f"esa {' '.join(path)} {p.opts[0]} has no --no- form"
    out = subprocess.run([sys.executable, str(REPO / "phase1_runner_enhanced.py"), "--help"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "COLUMNS": "250"}, cwd=REPO)
    assert out.returncode == 0 and "--save-scores" in out.stdout and "<bool>" not in out.stdout


def test_help_is_grouped_into_panels():
    text = help_text("perturb")
    for panel in ("Model and data", "Metric and selection", "Perturbation", "Output"):
        assert panel in text, panel


@pytest.fixture
def captured(monkeypatch):
    """Run a phase command up to its library call, and keep the configuration it would have run."""
    import esa.commands.baseline
    import esa.commands.profile
    import esa.commands.run

    seen = []

    def capture(config, **_):
        seen.append(config)
        raise EsaError("captured")

    for module, name in ((esa.commands.baseline, "run_baseline"), (esa.commands.profile, "run_profile"),
                         (esa.commands.run, "run_runbook")):
        monkeypatch.setattr(module, name, capture)
    return seen


def test_overwrite_is_a_flag_with_a_no_form(captured):
    for args, expected in (([], False), (["--overwrite"], True), (["--no-overwrite"], False),
                           (["--overwrite", "--no-overwrite"], False)):
        result = runner.invoke(app, ["baseline", *args])
        assert "captured" in result.output, result.output
        assert captured[-1].overwrite is expected, args
    result = runner.invoke(app, ["baseline", "--overwrite", "true"])
    assert result.exit_code == 2 and "true" in result.output  # a flag takes no value


def test_defaults_come_from_the_configuration(captured):
    runner.invoke(app, ["profile"])
    assert captured[-1] == ProfileConfig()
    runner.invoke(app, ["run"])
    assert captured[-1] == RunbookConfig()
    assert f"default: {HESSIAN_BUDGET}" in help_text("run")


def test_esa_run_hands_every_option_to_its_phases(captured):
    from esa.commands.run import phase_configs, resolve

    result = runner.invoke(app, [
        "run", "--revision", "main", "--no-trust-remote-code", "--attn-implementation", "sdpa", "--include-biases",
        "--include-norms", "--hessian-budget", "12", "--score-groups", "2", "--bottom-k-include-unused",
        "--stability-check", "--stability-fraction", "0.25", "--save-scores", "--perturb", "sign_flip",
        "--unstratified", "--control-sets", "7", "--n-bootstrap", "200", "--seq-len", "16", "--dataset",
        "embedded", "--out-dir", "somewhere"])
    assert "captured" in result.output, result.output
    phases = phase_configs(resolve(captured[-1]))
    profile, perturb = phases["profile"], phases["perturb"]
    for config in phases.values():
        assert config.model.revision == "main" and config.model.attn_implementation == "sdpa"
        assert config.data.seq_len == 16
    sel = profile.selection
    assert (sel.include_biases, sel.include_norms, sel.hessian_budget, sel.score_groups,
            sel.bottom_k_include_unused) == (True, True, 12, 2, True)
    assert profile.save_scores and profile.stability_check and profile.stability_fraction == 0.25
    assert perturb.selection == sel and perturb.perturb == "sign_flip"
    assert (perturb.random_stratified, perturb.control_sets, perturb.n_bootstrap) == (False, 7, 200)
    assert perturb.stability_fraction == 0.25 and perturb.from_profile.endswith("profile")


def test_every_option_is_declared_once():
    from esa import options as library

    declared = [v for v in vars(library).values() if isinstance(v, library.Opt)]
    library.check_unique(declared)  # no two declarations share a flag or a parameter name
    tree = ast.parse((REPO / "cli" / "main.py").read_text())
    inline = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and n.func.attr in ("Option", "Argument")]
    assert not inline, f"cli/main.py declares options itself (lines {inline}); declare them in esa/options.py"
    by_flag = {f: d for d in declared for f in d.long_flags}
    for path, cmd in commands():
        for flag in flags(cmd) - {"--version"}:
            assert flag in by_flag, f"esa {' '.join(path)} {flag} is not declared in esa/options.py"


def test_tiny_train_defaults_are_the_recipe():
    from esa.tiny.train import TinyRecipe

    params = {p.name: p.default for p in dict(commands())[("tiny", "train")].params}
    assert (params["steps"], params["seed"]) == (TinyRecipe().steps, TinyRecipe().seed)


@pytest.mark.parametrize("config, message", [
    (ProfileConfig(selection=SelectionConfig(topk=0)), "--topk must be at least 1"),
    (ProfileConfig(selection=SelectionConfig(hutchinson_probes=0)), "--hutchinson-probes must be at least 1"),
    (ProfileConfig(selection=SelectionConfig(mode="per_head")), "unknown --mode"),
    (ProfileConfig(selection=SelectionConfig(metric="fisher")), "unknown --metric"),
    (ProfileConfig(data=DataConfig(batch_size=0)), "--batch-size must be at least 1"),
    (ProfileConfig(seeds=[1, 1]), "repeats a seed"),
    (ProfileConfig(seeds=[0], stability_check=True), "at least two --seeds"),
    (PerturbConfig(controls=["random_k", "top_k"]), "unknown control 'top_k'"),
    (PerturbConfig(perturb="melt"), "unknown --perturb"),
    (PerturbConfig(n_bootstrap=10), "--n-bootstrap must be at least 100"),
    (PerturbConfig(from_profile="a", weights_file="b"), "either --from-profile or --weights"),
    (RunbookConfig(perturb="bit_flip", perturb_prob=2.0), "--perturb-prob must be in"),
    (RunbookConfig(selection=SelectionConfig(score_groups=0)), "--score-groups must be at least 1"),
    (ValidateConfig(sample=3), "--sample must be at least 10"),
])
def test_one_validation_for_every_configuration(config, message):
    with pytest.raises(EsaError, match=message):
        validate(config)


def test_esa_run_refuses_bad_values_before_loading_anything(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--perturb", "zero", "--n-bootstrap", "50", "--out-dir", str(out)])
    assert result.exit_code == 2 and "--n-bootstrap must be at least 100" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_resolution_returns_a_new_configuration_and_leaves_the_callers():
    from esa.scoreselect import open_for_selection
    from esa.commands.run import resolve

    model, data = ModelConfig(device="cpu"), DataConfig(max_samples=2, batch_size=2)
    # hessian_diag's double backward needs eager attention (hutchinson_diag/obd run forward-over-reverse on SDPA)
    session = open_for_selection(model, data, SelectionConfig(metric="hessian_diag"))
    assert model.attn_implementation is None and data.seq_len is None
    assert session.loaded.describe()["attn_implementation"] == "eager"
    assert resolve_attention(model, ["hessian_diag"]) == replace(model, attn_implementation="eager")
    assert resolve_attention(model, ["hutchinson_diag"]) is model
    assert resolve_attention(model, ["magnitude"]) is model
    cfg = RunbookConfig(selection=SelectionConfig(metric="obd"))
    resolved = resolve(cfg)
    assert cfg == RunbookConfig(selection=SelectionConfig(metric="obd"))  # untouched
    assert resolved.data.seq_len == session.windows.input_ids.shape[1] and resolved.data.dataset == "embedded"
