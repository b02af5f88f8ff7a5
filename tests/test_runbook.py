"""The runbook's nine commands, exactly as docs/RUNBOOK.md lists them, through phase1_runner_enhanced.py.

Scaled down: the embedded model, small k and few windows, CPU. Every promised file must exist and parse; then
`esa report` over all nine gives the checklist, whose values must equal those in the run files, also after the
run directories have been moved.
"""

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esa.cli.main import app
from esa.reporting import checklist as cl
from esa.runio import read_json
from helpers import REPO

RUNBOOK = REPO / "docs" / "RUNBOOK.md"
SCALE = {"--model": "esa-tiny", "--topk": "8", "--max-samples": "6", "--batch-size": "3", "--device": "cpu"}
PNG = b"\x89PNG\r\n\x1a\n"


def runbook_commands() -> list[list[str]]:
    """The argv (after the script name) of every runner command in docs/RUNBOOK.md."""
    lines = [l.strip() for l in RUNBOOK.read_text().splitlines()]
    commands = [shlex.split(l)[2:] for l in lines if l.startswith("python phase1_runner_enhanced.py ")]
    assert len(commands) == 9, "docs/RUNBOOK.md must list the nine runbook commands"
    return commands


def scaled(argv: list[str], out_root: Path) -> list[str]:
    out = list(argv)
    for i, flag in enumerate(out[:-1]):
        if flag in SCALE:
            out[i + 1] = SCALE[flag]
        elif flag == "--out-dir":
            out[i + 1] = str(out_root / Path(out[i + 1]).name)
    return out


def out_dir_of(argv: list[str]) -> Path:
    return Path(argv[argv.index("--out-dir") + 1])


def run_runner(argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", ESA_PROGRESS="0")
    return subprocess.run([sys.executable, str(REPO / "phase1_runner_enhanced.py"), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    root = tmp_path_factory.mktemp("runbook")
    done = []
    for argv in runbook_commands():
        argv = scaled(argv, root)
        proc = run_runner(argv)
        assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        done.append((argv, proc.stdout))
    return root, done


def parse(path: Path):
    assert path.exists() and path.stat().st_size > 0, path
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".jsonl":
        return [json.loads(l) for l in path.read_text().splitlines()]
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows, path
        return rows
    if path.suffix == ".png":
        assert path.read_bytes()[:8] == PNG, path
    if path.suffix == ".pdf":
        assert path.read_bytes()[:5] == b"%PDF-", path
    return path.read_text() if path.suffix in (".md", ".html", ".tex") else None


def test_every_command_writes_every_promised_file(nine):
    _, done = nine
    for argv, stdout in done:
        d = out_dir_of(argv)
        for name in ("config.json", "experiment_manifest.json", "metrics.json", "window_nll.csv"):
            parse(d / "baseline" / name)
        for name in ("config.json", "experiment_manifest.json", "metrics.json", "top_weights.csv",
                     "bottom_weights.csv", "tensor_stats.csv", "score_stats.json", "locations.csv", "ccdf.csv"):
            parse(d / "profile" / name)
        for stem in ("score_ccdf", "heatmap_topk_count", "heatmap_score_mass", "top_locations"):
            parse(d / "profile" / "plots" / f"{stem}.png")
            parse(d / "profile" / "plots" / f"{stem}.pdf")
        profile_metrics = parse(d / "profile" / "metrics.json")
        assert profile_metrics["metric"] == argv[argv.index("--metric") + 1]
        assert profile_metrics["topk"] == 8
        if "--stability-check" in argv:
            assert set(parse(d / "profile" / "stability.json")["pairwise_jaccard"]) == {"0-1", "0-2", "1-2"}
        if "--perturb" in argv:
            results = parse(d / "perturb" / "results.json")
            assert results["perturbation"]["kind"] == argv[argv.index("--perturb") + 1]
            assert set(results["conditions"]) == {"super", "random_k", "bottom_k"}
            assert results["source"] == "from_profile"
            # baseline, super and bottom_k per seed, then the default 39 random_k control sets
            assert len(parse(d / "perturb" / "trials.jsonl")) == 1 + 3 * 2 + 39
            assert results["tests"]["super_vs_random_k"]["n_control_sets"] == 39
            parse(d / "perturb" / "sets" / "super_seed2.csv")
            parse(d / "perturb" / "plots" / "delta_ppl.png")
            assert "effect ratio" in stdout
        else:
            assert not (d / "perturb").exists()
        report = d / "report"
        for name in ("report.html", "report.md", "tables.tex", "checklist.json", "report.json"):
            parse(report / name)
        for fig in parse(report / "report.json")["figures"]:
            parse(report / fig)
            parse((report / fig).with_suffix(".pdf"))
        assert "evidence checklist" in stdout


def test_rerun_reuses_finished_phases_and_a_changed_flag_is_refused(nine, tmp_path):
    _, done = nine
    for argv, _ in done:  # every experiment, hutchinson_diag (eager attention) and default seq_len included
        trials = out_dir_of(argv) / "perturb" / "trials.jsonl"
        before = trials.read_text() if trials.exists() else None
        again = run_runner(argv)
        assert again.returncode == 0, (argv, again.stderr)
        assert again.stdout.count("reusing the finished run") == (3 if "--perturb" in argv else 2), again.stdout
        assert (trials.read_text() if trials.exists() else None) == before
    argv = next(a for a, _ in done if "--perturb" in a)
    changed = list(argv)
    changed[changed.index("--topk") + 1] = "9"
    refused = run_runner(changed)
    assert refused.returncode == 2 and "another configuration" in refused.stderr
    assert "Traceback" not in refused.stderr
    # Without --perturb, the report of an out-dir leaves out a perturb run left there by an earlier command.
    copy = tmp_path / "copy"
    shutil.copytree(out_dir_of(argv), copy)
    without = argv[:argv.index("--perturb")]
    without[without.index("--out-dir") + 1] = str(copy)
    result = run_runner(without)
    assert result.returncode == 0, result.stderr
    kinds = [r["kind"] for r in json.loads((copy / "report" / "report.json").read_text())["runs"]]
    assert kinds == ["baseline", "profile"]


def same(a, b) -> bool:
    """Equal, NaN included (non-finite numbers are stored as "nan"/"inf" strings and read back as floats)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def _checklist_by_name(checklist: dict) -> dict:
    return {(c["name"], c["run"]): c for c in checklist["criteria"]}


def test_report_over_all_nine_matches_the_run_files(nine, tmp_path):
    root, done = nine
    runner = CliRunner()
    result = runner.invoke(app, ["report", *[str(out_dir_of(a)) for a, _ in done], "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    checklist = read_json(tmp_path / "rep" / "checklist.json")
    by_name = _checklist_by_name(checklist)

    # Effect ratio, p-values, Jaccard: the report carries the run files' numbers unchanged.
    for argv, _ in done:
        d = out_dir_of(argv)
        label = f"{d.name}/perturb"
        if (d / "perturb").exists():
            results = read_json(d / "perturb" / "results.json")
            assert same(by_name[(cl.EFFECT, label)]["value"], results["effect_ratio"]["value"])
            assert same(by_name[(cl.RANK, label)]["value"], results["tests"]["super_vs_random_k"]["p_value"])
            assert by_name[(cl.RANK, label)]["unit"] == "weight set"
        stability = d / "profile" / "stability.json"
        if stability.exists():
            assert same(by_name[("top-k Jaccard across seeds", f"{d.name}/profile")]["value"],
                        read_json(stability)["mean_jaccard"])
        base = json.loads((d / "baseline" / "metrics.json").read_text())
        assert by_name[("finite baseline loss", f"{d.name}/baseline")]["value"] == base["mean_nll"]

    # Cross-metric overlap, recomputed here from the top_weights.csv files: runs with the same mode, k, windows
    # and tensors; one run per metric (the first by name), as the report's protocol says.
    def top_set(d):
        with open(d / "profile" / "top_weights.csv", newline="") as f:
            return {(r["tensor"], int(r["flat_index"])) for r in csv.DictReader(f)}

    def setting(argv):
        return tuple(argv[argv.index(f) + 1] if f in argv else None
                     for f in ("--mode", "--topk", "--max-samples", "--include"))

    groups: dict = {}
    for argv, _ in sorted(done, key=lambda a: out_dir_of(a[0]).name):
        metric = argv[argv.index("--metric") + 1]
        groups.setdefault(setting(argv), {}).setdefault(metric, out_dir_of(argv))
    chosen = list(max(groups.values(), key=len).values())
    assert len(chosen) == 3  # grad_x_weight, grad_squared and act_mag, global, 6 windows, every tensor
    gradient = [d for d in chosen if "act" not in d.name]  # the row uses the gradient metrics' pairs only
    overlaps = [len(top_set(a) & top_set(b)) / min(len(top_set(a)), len(top_set(b)))
                for i, a in enumerate(gradient) for b in gradient[i + 1:]]
    overlap = next(c for c in checklist["criteria"] if c["name"] == cl.OVERLAP)
    assert overlap["status"] != "not measured"
    assert overlap["value"] == pytest.approx(sum(overlaps) / len(overlaps), rel=1e-12)

    # Every checklist row appears in the HTML with its value and status.
    page = (tmp_path / "rep" / "report.html").read_text()
    from esa.reporting.tables import fmt

    for c in checklist["criteria"]:
        shown = c["value"] if isinstance(c["value"], str) else fmt(c["value"])
        assert shown.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in page, c
    assert page.count('class="l status-') == len(checklist["criteria"])


def test_report_html_is_self_contained_and_markdown_links_resolve(nine, tmp_path):
    import base64
    import io

    import matplotlib.image as mpimg

    root, done = nine
    out = tmp_path / "rep"
    assert CliRunner().invoke(app, ["report", str(out_dir_of(done[-1][0])), "--out", str(out)]).exit_code == 0
    page = (out / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources and not re.search(r'(src|href)="(?!data:|#)', page), "the HTML must not reference other files"
    for src in sources:
        header, data = src.split(",", 1)
        assert header == "data:image/png;base64"
        image = mpimg.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert image.shape[0] > 50 and image.shape[1] > 50
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (out / "report.md").read_text())
    assert len(links) == len(sources)
    for link in links:
        assert (out / link).read_bytes()[:8] == PNG


def test_report_after_the_runs_moved_to_another_machine(nine, tmp_path):
    root, done = nine
    dirs = [out_dir_of(a) for a, _ in done]
    original = CliRunner().invoke(app, ["report", *map(str, dirs), "--out", str(tmp_path / "here")])
    assert original.exit_code == 0, original.output
    moved_root = tmp_path / "elsewhere" / "copied_runs"
    shutil.copytree(root, moved_root)
    hidden = root.with_name(root.name + "_hidden")
    root.rename(hidden)  # the old paths no longer exist while the report reads the copies
    try:
        moved = CliRunner().invoke(app, ["report", *[str(moved_root / d.name) for d in dirs], "--out",
                                         str(tmp_path / "there")])
    finally:
        hidden.rename(root)
    assert moved.exit_code == 0, moved.output
    for name in ("checklist.json", "report.json"):
        a = json.loads((tmp_path / "here" / name).read_text())
        b = json.loads((tmp_path / "there" / name).read_text())
        assert a == b, name
    assert json.loads((tmp_path / "there" / "report.json").read_text())["comparison"] is not None
    assert str(tmp_path) not in (tmp_path / "there" / "report.json").read_text()
