"""Find and read finished runs under the directories given to ``esa report``; never loads a model.

A directory given to the report is either a run directory (``esa baseline/profile/perturb --out-dir``) or a
folder of them (the out-dir of ``esa run``, or any folder of run directories, one level deep). The kind of a
run is read from the files it holds. Only paths relative to each run directory are used, so run directories
copied to another machine or moved report the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from esa.errors import EsaError
from esa.runio import MANIFEST, is_finished, read_json

KINDS = ("baseline", "profile", "perturb", "validate")


@dataclass
class Run:
    kind: str
    dir: Path
    label: str
    config: dict
    manifest: dict
    data: dict = field(default_factory=dict)  # metrics.json (baseline, profile), results.json (perturb), validate.json
    stability: dict | None = None  # stability.json of a profile run
    key: str = ""  # unique, file- and LaTeX-label-safe form of the label

    @property
    def model_id(self) -> str | None:
        return self.manifest.get("model", {}).get("model_id")


@dataclass
class Collection:
    runs: list[Run]
    skipped: list[str]  # "DIR: reason" for folders that looked like runs but are not finished

    def of(self, kind: str) -> list[Run]:
        return [r for r in self.runs if r.kind == kind]


def kind_of(run_dir: Path) -> str | None:
    if (run_dir / "validate.json").exists() or (run_dir / "ablations.jsonl").exists():
        return "validate"
    if (run_dir / "results.json").exists() or (run_dir / "trials.jsonl").exists():
        return "perturb"
    if (run_dir / "top_weights.csv").exists():
        return "profile"
    if (run_dir / "window_nll.csv").exists():
        return "baseline"
    return None


def read_run(run_dir: Path, label: str) -> Run:
    kind = kind_of(run_dir)
    if kind is None:
        raise EsaError(f"{run_dir} holds no baseline, profile or perturb results")
    run = Run(kind, run_dir, label, read_json(run_dir / "config.json"), read_json(run_dir / MANIFEST))
    run.data = read_json(run_dir / {"perturb": "results.json", "validate": "validate.json"}.get(kind, "metrics.json"))
    if kind == "profile" and (run_dir / "stability.json").exists():
        run.stability = read_json(run_dir / "stability.json")
    return run


def collect(dirs: list[Path]) -> Collection:
    """Every finished run in ``dirs`` (each a run directory or a folder of them), in a stable order."""
    if not dirs:
        raise EsaError("esa report needs at least one run directory")
    runs: list[Run] = []
    skipped: list[str] = []
    seen: set[Path] = set()
    for root in dirs:
        root = Path(root)
        name = root.resolve().name  # "." and "runs/" label as the folder's own name
        if not root.is_dir():
            raise EsaError(f"{root} is not a directory")
        candidates = [(root, name)] if kind_of(root) else [
            (d, f"{name}/{d.name}") for d in sorted(root.iterdir()) if d.is_dir() and kind_of(d)]
        if not candidates:
            raise EsaError(f"{root} holds no run (no baseline, profile or perturb results in it or one level below)")
        for run_dir, label in candidates:
            key = run_dir.resolve()
            if key in seen:
                continue
            seen.add(key)
            if not is_finished(run_dir):
                skipped.append(f"{label}: unfinished (no complete experiment_manifest.json)")
                continue
            runs.append(read_run(run_dir, label))
    if not runs:
        raise EsaError("no finished run among the directories given: " + "; ".join(skipped))
    labels: dict[str, int] = {}
    for r in runs:  # two run directories of the same name given directly: keep labels distinct
        labels[r.label] = labels.get(r.label, 0) + 1
        if labels[r.label] > 1:
            r.label = f"{r.label} ({labels[r.label]})"
    order = {k: i for i, k in enumerate(KINDS)}
    runs.sort(key=lambda r: (order[r.kind], r.label))
    keys: set[str] = set()
    for r in runs:
        base = "".join(ch if ch.isalnum() else "_" for ch in r.label).strip("_") or "run"
        r.key, i = base, 2
        while r.key in keys:  # labels like "x-y" and "x_y" would share a file name
            r.key, i = f"{base}_{i}", i + 1
        keys.add(r.key)
    return Collection(runs, skipped)
