"""What a new user meets first (issue 12): readable files, truthful records, tables that read at 80 columns and in
logs, a report that refuses to be replaced silently, `esa --version`, and an installation that leaves no litter."""

import json
import os
import re
import stat
import subprocess
import sys
import tomllib

import pytest
from typer.testing import CliRunner

from esa.cli.main import app
from helpers import REPO

runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ESA_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
FAST = ["--seq-len", "64", "--max-samples", "6", "--batch-size", "6"]


# ----------------------------------------------------------------------------------------------- 1. file modes
def test_written_files_get_the_mode_the_umask_allows(tmp_path):
    from esa.runio import append_jsonl, atomic_write_csv, atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        atomic_write_csv(tmp_path / "b.csv", ["x"], [[1]])
        append_jsonl(tmp_path / "c.jsonl", {"x": 1})
        os.umask(0o077)
        atomic_write_json(tmp_path / "private.json", {"x": 1})
    finally:
        os.umask(old)
    for name in ("a.json", "b.csv", "c.jsonl"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


# ----------------------------------------------------------------------------------------------- 6. float noise
def test_json_floats_are_rounded_in_one_place_but_trials_keep_full_precision(tmp_path):
    from esa.runio import append_jsonl, atomic_write_json, read_json, read_jsonl

    noisy = 1.0001 - 1.0  # 9.999999999998899e-05 in binary floating point
    assert repr(noisy) == "9.999999999998899e-05"
    atomic_write_json(tmp_path / "r.json", {"delta": noisy, "nested": [1 / 3, float("nan")], "n": 7})
    text = (tmp_path / "r.json").read_text()
    assert "9.999999999998899e-05" not in text and '"delta": 0.0001' in text
    back = read_json(tmp_path / "r.json")
    assert back["delta"] == 0.0001 and abs(back["nested"][0] - 1 / 3) < 1e-12 and back["n"] == 7
    append_jsonl(tmp_path / "t.jsonl", {"nll": noisy})
    assert read_jsonl(tmp_path / "t.jsonl")[0]["nll"] == noisy  # the raw data statistics are recomputed from


def test_table_numbers_keep_one_precision_in_a_column():
    from esa.report.tables import fmt

    assert [fmt(30.0), fmt(71.1111), fmt(0.5), fmt(30)] == ["30.00", "71.11", "0.5000", "30"]


# ----------------------------------------------------------------------------------------------- 3. report overwrite
def test_report_refuses_to_replace_a_report_without_overwrite(tmp_path):
    from esa.report.build import check_report_dir

    out = tmp_path / "rep"
    out.mkdir()
    check_report_dir(out, overwrite=False)  # an empty folder is fine
    (out / "report.html").write_text("<html>old</html>")
    result = runner.invoke(app, ["report", str(tmp_path / "nothing-here"), "--out", str(out)])
    assert result.exit_code == 2 and "already holds a report" in result.output and "--overwrite" in result.output
    assert (out / "report.html").read_text() == "<html>old</html>"
    check_report_dir(out, overwrite=True)


# ----------------------------------------------------------------------------------------------- 7. version, tiny
def test_version():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"esa {version('esa')}"


def test_tiny_train_defaults_to_a_new_folder_and_refuses_to_overwrite(tmp_path, monkeypatch):
    from esa.tiny import ASSETS_DIR
    from esa.tiny import train as tiny

    called = []
    monkeypatch.setattr(tiny, "TinyRecipe", lambda **kw: kw)
    monkeypatch.chdir(tmp_path)
    real_check = tiny.check_out_dir

    def fake_train(out_dir, recipe, *, overwrite=False):
        real_check(out_dir, overwrite=overwrite)
        called.append(out_dir)
        return {"held_out_ppl": 1.0, "uniform_guess_ppl": 2}

    monkeypatch.setattr(tiny, "train", fake_train)
    assert runner.invoke(app, ["tiny", "train"]).exit_code == 0
    assert called[-1].resolve() == (tmp_path / "esa-tiny").resolve() != ASSETS_DIR
    # The shipped model is never the default target, and a folder holding a model needs --overwrite.
    result = runner.invoke(app, ["tiny", "train", "--out-dir", str(ASSETS_DIR)])
    assert result.exit_code == 2 and "already holds a model" in result.output and len(called) == 1
    assert runner.invoke(app, ["tiny", "train", "--out-dir", str(ASSETS_DIR), "--overwrite"]).exit_code == 0


def _minutes(text: str) -> set[int]:
    return {int(m) for m in re.findall(r"about (\d+) minutes", " ".join(text.split()))}


def test_readme_and_help_state_the_same_training_time_and_it_is_the_measured_one():
    from esa.runio import read_json
    from esa.tiny import ASSETS_DIR

    readme = (REPO / "README.md").read_text()
    line = next(l for l in readme.splitlines() if l.startswith("esa tiny train"))
    result = runner.invoke(app, ["tiny", "train", "--help"], env={"COLUMNS": "200"})
    assert _minutes(line) == _minutes(result.output) and len(_minutes(line)) == 1
    measured = read_json(ASSETS_DIR / "training.json")["seconds"] / 60  # the shipped model's own training time
    assert abs(_minutes(line).pop() - measured) <= 1


# ----------------------------------------------------------------------------------------------- 8. packaging, CI
def test_pyproject_uses_an_spdx_license_and_lists_every_package_folder():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT"
    setuptools_req = next(r for r in meta["build-system"]["requires"] if r.startswith("setuptools"))
    assert int(re.search(r">=\s*(\d+)", setuptools_req).group(1)) >= 77  # SPDX strings need setuptools 77
    packages = set(meta["tool"]["setuptools"]["packages"])
    for folder in (REPO / "esa").rglob("*"):
        if folder.is_dir() and folder.name != "__pycache__" and any(f.is_file() for f in folder.iterdir()):
            assert "esa." + folder.relative_to(REPO / "esa").as_posix().replace("/", ".") in packages, folder


def test_ci_script_removes_its_virtualenv(tmp_path):
    """Run .ci/run with stand-ins for python3/chromium: the venv it made in $TMPDIR is gone when it exits."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(
        '#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin"; touch "$3/big"\n'
        '  printf \'PATH="%s/bin:$PATH"\\n\' "$3" > "$3/bin/activate"\n'
        '  printf \'#!/bin/sh\\nexit 0\\n\' > "$3/bin/python"; chmod +x "$3/bin/python"; fi\n')
    (fake / "chromium").write_text("#!/bin/sh\nexit 0\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**ENV, "PATH": f"{fake}:{os.environ['PATH']}", "TMPDIR": str(scratch)}
    result = subprocess.run(["bash", str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert list(scratch.iterdir()) == []
