"""The Python API (esa.api): each function writes the files its command writes; a model in memory gives the
results its name gives; bad options are one-line errors; the README's notebook example runs."""

from __future__ import annotations

import inspect
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import esa
from esa import api
from esa.cli import main as cli
from esa.errors import EsaError
from esa.runio import to_json
from helpers import REPO, load_embedded

runner = CliRunner()
FAST = {"seq_len": 64, "max_samples": 8, "batch_size": 4}
# what a manifest records about this particular execution, not about the run
VOLATILE = ("created_utc", "argv", "timings_s")


def flags(**options) -> list[str]:
    """Keyword options as command-line flags (``seq_len=64`` → ``--seq-len 64``; True → the bare flag)."""
    out = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False:
            out += [flag, str(value)]
    return out


def cli_run(*args) -> None:
    result = runner.invoke(cli.app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def normalised(path: Path) -> bytes:
    """A file's bytes, with what differs between two executions of the same run taken out: the manifest's time,
    argv, timings and measured memory; each trial's or ablation's "seconds"; the report's "Generated <time>" line;
    a PDF's creation date."""
    data = path.read_bytes()
    if path.name == "experiment_manifest.json":
        manifest = json.loads(data)
        for key in VOLATILE:
            manifest.pop(key)
        manifest["memory"].pop("measured_peak_bytes")
        return json.dumps(manifest, sort_keys=True).encode()
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in data.splitlines()]
        return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in records], sort_keys=True).encode()
    if path.suffix in (".md", ".html"):
        return re.sub(rb"Generated \d{4}-\d\d-\d\d \d\d:\d\d UTC", b"Generated", data)
    if path.suffix == ".pdf":
        return re.sub(rb"/CreationDate \(D:[^)]*\)", b"", data)
    return data


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): normalised(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def without_run_times(root: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """The report of an ``esa run`` tree with each phase's creation time and total seconds (its environment table,
    from the phase's manifest) taken out: two executions differ there."""
    out = dict(files)
    # the seconds are the row's last cell, printed at the column's precision (so not always as fmt prints them)
    row_end = rb"(?=\s*(?:\|\s*\n|</td>\s*</tr>|\\\\))"
    for manifest in root.glob("*/experiment_manifest.json"):
        created = str(json.loads(manifest.read_text())["created_utc"]).encode()
        for name in ("report/report.html", "report/report.md", "report/tables.tex"):
            out[name] = re.sub(re.escape(created) + rb"(.*?)[0-9][0-9.e+-]*" + row_end, rb"<created>\1<seconds>",
                               out[name], flags=re.S)
    return out


def same_files_as_cli(tmp_path: Path, name: str, cli_args: list, api_call, fix=None) -> dict[str, bytes]:
    """Run the command, move its output aside, run the API into the same path (paths are recorded in some files)
    and compare the two trees file by file (after ``fix(root, files)`` when given)."""
    target = tmp_path / name
    cli_run(*cli_args)
    by_cli = tree(target) if fix is None else fix(target, tree(target))
    shutil.move(target, tmp_path / f"{name}.cli")
    api_call(target)
    by_api = tree(target) if fix is None else fix(target, tree(target))
    assert set(by_api) == set(by_cli)
    differ = [f for f in by_cli if by_cli[f] != by_api[f]]
    assert not differ, f"API and CLI files differ: {differ}"
    return by_api


@pytest.fixture(scope="module")
def profile_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("api") / "profile"
    esa.profile(**FAST, metric="grad_x_weight", topk=5, out_dir=out)
    return out


# ----------------------------------------------------------------------------------------------- same files
def test_baseline(tmp_path):
    same_files_as_cli(tmp_path, "baseline", ["baseline", *flags(**FAST), "--out-dir", tmp_path / "baseline"],
                      lambda out: esa.baseline(**FAST, out_dir=out))


def test_profile_with_stability_and_scores(tmp_path):
    opts = dict(FAST, metric="grad_squared", mode="global", topk=20, stability_check=True, seeds="0,1",
                save_scores=True)
    files = same_files_as_cli(tmp_path, "profile", ["profile", *flags(**opts), "--out-dir", tmp_path / "profile"],
                              lambda out: esa.profile(**opts, out_dir=out))
    assert "stability/top_weights_seed1.csv" in files and "scores.safetensors" in files


def test_perturb_from_profile(tmp_path, profile_run):
    opts = dict(FAST, perturb="sign_flip", control_sets=3, n_bootstrap=100, seeds="0")
    same_files_as_cli(tmp_path, "perturb",
                      ["perturb", *flags(**opts), "--from-profile", profile_run, "--out-dir", tmp_path / "perturb"],
                      lambda out: esa.perturb(**opts, from_profile=profile_run, out_dir=out))


def test_superweights(tmp_path):
    same_files_as_cli(tmp_path, "sw", ["superweights", "--threshold", "1", "--out-dir", tmp_path / "sw"],
                      lambda out: esa.superweights(threshold=1.0, out_dir=out))


def test_validate(tmp_path):
    opts = dict(FAST, metrics="magnitude,grad_x_weight", sample=12, topk=2, n_bootstrap=100)
    same_files_as_cli(tmp_path, "val", ["validate", *flags(**opts), "--out-dir", tmp_path / "val"],
                      lambda out: esa.validate(**{**opts, "metrics": ["magnitude", "grad_x_weight"]}, out_dir=out))


def test_compare_and_report(tmp_path, profile_run):
    other = tmp_path / "magnitude"
    esa.profile(**FAST, metric="magnitude", topk=5, out_dir=other)
    runs = [profile_run, other]
    files = same_files_as_cli(tmp_path, "cmp", ["compare", *runs, "--out", tmp_path / "cmp"],
                              lambda out: esa.compare(runs, out=out))
    assert "compare.json" in files
    in_memory = json.loads(to_json(esa.compare(runs).result))  # as compare.json rounds it
    assert in_memory == json.loads((tmp_path / "cmp" / "compare.json").read_text())
    files = same_files_as_cli(tmp_path, "rep", ["report", *runs, "--out", tmp_path / "rep"],
                              lambda out: esa.report(runs, out=out))
    assert "report.html" in files and any(f.startswith("figures/") for f in files)


def test_run(tmp_path):
    opts = dict(FAST, topk=5, dataset="embedded")
    result = None

    def call(out):
        nonlocal result
        result = esa.run(**opts, out_dir=out)

    same_files_as_cli(tmp_path, "rb", ["run", *flags(**opts), "--out-dir", tmp_path / "rb"], call,
                      fix=without_run_times)
    assert result.perturb is None and result.profile.top and result.report.checklist["criteria"]
    assert result.baseline.out_dir == tmp_path / "rb" / "baseline"


def test_plan():
    opts = dict(command="profile", metric="hutchinson_diag", seq_len=128, max_samples=16, device_memory="1GB")
    out = runner.invoke(cli.app, ["plan", *flags(**opts), "--json"])
    assert out.exit_code in (0, 1), out.output
    planned = esa.plan(**opts)
    assert planned.plan == json.loads(out.stdout) and planned.fits == (out.exit_code == 0)


# ----------------------------------------------------------------------------------------------- results
def test_results_hold_the_files_and_no_out_dir_writes_nothing(tmp_path, monkeypatch, profile_run):
    monkeypatch.chdir(tmp_path)
    result = esa.profile(**FAST, metric="grad_x_weight", topk=5, return_scores=True)
    assert result.out_dir is None and list(tmp_path.iterdir()) == []
    written = api.read_profile(profile_run, profile_run)
    assert result.top == written.top and result.metrics == written.metrics and result.config["selection"]["topk"] == 5
    # the scores are those of the top-k: row 0 of the top table is the largest score of its tensor
    first = result.top[0]
    scores = result.scores[first["tensor"]].reshape(-1)
    assert float(first["score"]) == pytest.approx(float(scores[int(first["flat_index"])]))
    assert float(first["score"]) == pytest.approx(float(scores.abs().max()))
    base = esa.baseline(**FAST)
    assert base.out_dir is None and base.ppl == base.metrics["ppl"] > 1 and len(base.window_nll) == 8
    assert list(tmp_path.iterdir()) == []


def test_a_loaded_model_gives_the_same_top_k_as_its_name(tmp_path):
    model, tokenizer = load_embedded()
    model.train()
    opts = dict(FAST, metric="grad_x_weight", mode="global", topk=30)
    by_name = esa.profile(**opts)
    in_memory = esa.profile(model=model, tokenizer=tokenizer, **opts, out_dir=tmp_path / "mem")
    assert in_memory.top == by_name.top and in_memory.bottom == by_name.bottom
    assert in_memory.metrics == by_name.metrics
    assert (tmp_path / "mem" / "top_weights.csv").exists()
    # the model is left as it was given: training mode, requires_grad flags
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert esa.baseline(model=model, tokenizer=tokenizer, **FAST).metrics["ppl"] == esa.baseline(**FAST).metrics["ppl"]


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call, message", [
    (lambda: esa.profile(topK=5), "has no option 'topK'; did you mean 'topk'?"),
    (lambda: esa.perturb(control_set=3), "did you mean 'control_sets'?"),
    (lambda: esa.baseline(tokenizer=object()), "tokenizer= goes with a model object"),
    (lambda: esa.baseline(model=torch.nn.Linear(2, 2)), "needs its tokenizer too"),
    (lambda: esa.baseline(model=3), "model must be a name, a path or a loaded transformers model"),
    (lambda: esa.profile(seeds="0,0"), "repeats a seed"),
    (lambda: esa.report([]), "needs at least 1 run directory"),
])
def test_bad_options_are_one_line_errors(call, message):
    with pytest.raises(EsaError, match=re.escape(message)) as e:
        call()
    assert "\n" not in str(e.value)


def test_a_model_object_refuses_loading_options():
    model, tokenizer = load_embedded()
    with pytest.raises(EsaError, match=re.escape("dtype= does not apply to a model object")):
        esa.baseline(model=model, tokenizer=tokenizer, dtype="bfloat16")


# ----------------------------------------------------------------------------------------------- the interface
@pytest.mark.parametrize("command", ["baseline", "profile", "perturb", "superweights", "validate", "run", "plan",
                                     "report", "compare"])
def test_options_are_the_command_lines(command):
    """The function's keyword arguments are its command's parameters, in the same order with the same defaults, as
    the two signatures say (what a notebook shows, what typer parses); out_dir / out default to no files."""
    cli_params = {n: p.default for n, p in inspect.signature(getattr(cli, command)).parameters.items()
                  if n != "json_output"}  # esa plan --json: how to print, not what to plan
    extra = set(api.EXTRA_OPTIONS.get(command, {}))
    api_params = {n: p.default for n, p in inspect.signature(getattr(esa, command)).parameters.items()
                  if n not in extra}
    assert list(api_params) == list(cli_params)
    for name, default in cli_params.items():
        if name in ("out_dir", "out"):
            assert api_params[name] is None
        elif name == "run_dirs":
            assert default is inspect.Parameter.empty and api_params[name] is None
        else:
            assert api_params[name] == default, name
    # and the function takes exactly these: an option of the command line is never refused
    assert set(api.options(command, dict.fromkeys(cli_params, None))) == set(api_params) | extra


def test_import_esa_is_light_and_its_commands_are_the_api_functions():
    """``import esa`` loads no torch; ``esa.profile`` etc. are the esa.api functions, also after their command
    modules (esa.commands.*) and the library are imported."""
    import subprocess
    import sys

    code = ("import sys, esa, esa.options; assert 'torch' not in sys.modules, 'torch'; "
            "assert 'typer' not in sys.modules, 'the option table imports typer'; "
            "import esa.commands.profile, esa.commands.baseline, esa.commands.run, esa.planning, esa.reporting; "
            "import esa.api as api; "
            "assert all(getattr(esa, n) is getattr(api, n) for n in esa.__all__), 'not the API'; "
            "import inspect; assert 'topk' in inspect.signature(esa.profile).parameters; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "ok", out.stderr
    assert set(esa.__all__) == set(api.COMMANDS)


def test_readme_notebook_example_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## From Python (a notebook)", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the README's From Python section has no python block"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
