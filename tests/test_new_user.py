"""What a new user meets first (issue 12): readable files, truthful records, tables that read at 80 columns and in
logs, a report that refuses to be replaced silently, `esa --version`, and an installation that leaves no litter."""

import os
import re
import stat
import subprocess
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
    from esa.reporting.tables import fmt

    assert [fmt(30.0), fmt(71.1111), fmt(0.5), fmt(30), fmt(2042.4)] == ["30.00", "71.11", "0.5000", "30", "2042"]


# ----------------------------------------------------------------------------------------------- 3. report overwrite
def test_report_refuses_to_replace_a_report_without_overwrite(tmp_path):
    from esa.reporting.build import check_report_dir

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


# ----------------------------------------------------------------------------------------------- a whole run
TEXT = os.path.join(os.path.dirname(os.__file__), "this.py")  # a small text every Python has
SMALL = ["--seq-len", "32", "--max-samples", "4", "--batch-size", "4", "--text-file", TEXT]


@pytest.fixture(scope="module")
def esa_run(tmp_path_factory):
    """`esa run` (baseline → profile → perturb → report) on a small random Llama, printed at 80 columns into a
    captured, non-terminal stream, as in a log file."""
    from esa.cli import main
    from helpers import save_random_model

    root = tmp_path_factory.mktemp("new_user")
    model = save_random_model("llama", root / "model")
    out = root / "run"
    old_width = main.console.width
    main.console.width = 80
    try:
        result = runner.invoke(app, ["run", "--model", str(model), *SMALL, "--mode", "global", "--topk", "3",
                                     "--perturb", "zero", "--seeds", "0,1", "--save-plots", "--out-dir", str(out)])
    finally:
        main.console.width = old_width
    assert result.exit_code == 0, result.output
    return model, out, result.output


def test_tables_at_80_columns_in_a_log_cut_nothing_and_follow_their_phase(esa_run):
    from esa.runio import read_json

    _, out, log = esa_run
    assert "…" not in log  # rich's mark of a cut value
    order = ["▶ baseline", "baseline —", "▶ profile", "profile —", "▶ perturb", "perturb —", "▶ report",
             "evidence checklist"]
    positions = [log.index(marker) for marker in order]
    assert positions == sorted(positions), log
    results = read_json(out / "perturb" / "results.json")
    for cond, c in results["conditions"].items():
        ci = c["ci95_delta_ppl"]
        assert f"[{ci[0]:+.3g}, {ci[1]:+.3g}]" in log and f"{c['delta_ppl']:+.4g}" in log, cond


def test_a_wide_table_stacks_instead_of_cutting(monkeypatch):
    import io

    from rich.console import Console
    from rich.table import Table

    from esa.cli import main

    buf = io.StringIO()
    monkeypatch.setattr(main, "console", Console(file=buf, width=80, highlight=False, soft_wrap=True))
    table = Table(title="wide")
    values = [f"[+0.00{i}123456789, +0.00{i}987654321]" for i in range(5)]
    for i in range(5):
        table.add_column(f"column {i}")
    table.add_row(*values)
    main.show(table)
    text = buf.getvalue()
    assert "…" not in text and all(v in text for v in values)
    buf.truncate(0)
    narrow = Table(title="narrow")
    narrow.add_column("a")
    narrow.add_row("1")
    main.show(narrow)
    assert "┃" in buf.getvalue() or "│" in buf.getvalue()  # a table that fits stays a grid


def test_perturb_from_profile_records_the_profiles_selection(esa_run, tmp_path):
    from esa.runio import read_json

    model, out, _ = esa_run
    result = runner.invoke(app, ["perturb", "--model", str(model), *SMALL, "--from-profile", str(out / "profile"),
                                 "--seeds", "0", "--n-bootstrap", "200", "--out-dir", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    recorded = read_json(tmp_path / "p" / "config.json")["selection"]
    assert recorded == read_json(out / "profile" / "config.json")["selection"]
    assert recorded["mode"] == "global" and recorded["topk"] == 3  # not the command's defaults (per_layer, 100)


def test_bottom_k_holds_no_unused_weight_and_says_how_many_it_left_out(esa_run):
    from esa.runio import read_csv_rows, read_json

    _, out, _ = esa_run
    bottom = read_csv_rows(out / "profile" / "bottom_weights.csv")
    assert len(bottom) == 3 and all(float(r["score"]) > 0 for r in bottom)
    record = read_json(out / "profile" / "metrics.json")["bottom_k"]
    # The text uses few of the 2,048 tokens: most embedding rows are unused and left out, and counted.
    assert record["unused_left_out"] >= 1000 * 32 and record["include_unused"] is False
    assert read_json(out / "profile" / "metrics.json")["zero_scores"] >= record["unused_left_out"]
    per_seed = read_json(out / "perturb" / "results.json")["bottom_k_unused_left_out"]
    assert per_seed == {"0": record["unused_left_out"], "1": record["unused_left_out"]}
    assert read_json(out / "perturb" / "results.json")["conditions"]["bottom_k"]["delta_ppl"] != 0


def test_bottom_k_include_unused_keeps_the_old_selection(esa_run, tmp_path):
    from esa.runio import read_csv_rows, read_json

    model, _, _ = esa_run
    result = runner.invoke(app, ["profile", "--model", str(model), *SMALL, "--mode", "global", "--topk", "3",
                                 "--bottom-k-include-unused", "--out-dir", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert all(float(r["score"]) == 0 for r in read_csv_rows(tmp_path / "p" / "bottom_weights.csv"))
    assert read_json(tmp_path / "p" / "metrics.json")["bottom_k"]["include_unused"] is True


def test_report_shows_the_top_locations_figure_and_titles_once(esa_run):
    _, out, _ = esa_run
    md = (out / "report" / "report.md").read_text()
    assert md.count("Evidence checklist") == 1 and "top_locations_" in md
    assert (out / "report" / "report.html").read_text().count("Evidence checklist") == 1


def test_top_locations_axes_name_token_ids_use_integer_ticks_and_do_not_overlap(monkeypatch, tmp_path):
    from esa import plots

    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, stem: figures.append(fig) or [])
    rows = [(i, t, "", comp, "", r, c, 0, s) for i, (t, comp, r, c, s) in enumerate([
        ("model.embed_tokens.weight", "embed", 5, 1, 3.0), ("model.embed_tokens.weight", "embed", 6, 2, 2.0),
        ("model.layers.0.mlp.down_proj.weight", "mlp.down", 1, 7, 1.5),
        ("lm_head.weight", "lm_head", 9, 3, 1.0)])]
    plots.plot_top_locations(rows, tmp_path / "x")
    fig = figures[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = fig.axes
    labels = {ax.get_title().split(" (")[0]: ax.get_ylabel() for ax in axes}
    assert labels["model.embed_tokens"] == labels["lm_head"] == "row (token id)"
    assert labels["model.layers.0.mlp.down_proj"] == "row (output channel)"
    for ax in axes:
        assert all(float(t).is_integer() for t in ax.get_yticks()) and all(float(t).is_integer() for t in ax.get_xticks())
    for left, right in zip(axes, axes[1:]):  # a panel's y label stays clear of the panel to its left
        assert right.yaxis.label.get_window_extent(renderer).x0 >= left.get_window_extent(renderer).x1


# ----------------------------------------------------------------------------------------------- in a browser
def _chromium() -> str:
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on this machine (apt-get install chromium; .ci/run installs it)")
    return path


def test_report_renders_in_headless_chromium(esa_run, tmp_path):
    """report.html in a real browser: every figure loads, nothing is logged as an error, every section is there."""
    chromium = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
    from esa.runio import read_json

    _, out, _ = esa_run
    report = out / "report" / "report.html"
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(report.as_uri(), wait_until="load")
            widths = page.evaluate("[...document.images].map(img => img.complete ? img.naturalWidth : 0)")
            sections = page.evaluate("[...document.querySelectorAll('h2')].map(h => h.innerText)")
            text = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    expected_figures = read_json(out / "report" / "report.json")["figures"]
    assert len(widths) == len(expected_figures) >= 5 and all(w > 0 for w in widths), widths
    assert sections == ["Evidence checklist", "Baseline", "Sensitivity profiles", "Perturbations", "Environment",
                        "Figures"]
    for caption in ("Where the top weights sit", "ΔPPL per condition", "Score CCDF per component"):
        assert caption in text
    assert (tmp_path / "report.png").stat().st_size > 10_000
