"""Run directories on disk: atomic writes, the finished-run guard, and reading results back.

Every file is written to a temporary name in the same directory, flushed, fsynced and renamed over the target
(``os.replace`` is atomic on POSIX and Windows), so a reader never sees a half-written file and a crash leaves
either the old file or the new one. A run directory is *finished* when its ``experiment_manifest.json`` says
``"status": "complete"``; that file is written last.

Under torchrun (:mod:`esa.distributed`) only rank 0 writes or removes files: on the other ranks the writers below
return without touching the disk, and :func:`prepare_run_dir` waits until every rank has checked the directory.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from esa import distributed
from esa.config import same_config
from esa.errors import EsaError

MANIFEST = "experiment_manifest.json"
JSON_SIGNIFICANT_DIGITS = 12  # floats in JSON files: enough for any measurement, no binary noise (1e-4, not 9.99…9e-05)


def _umask() -> int:
    """The process umask: from /proc on Linux, else by setting it and straight back (not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + fsync + rename).

    The file gets the mode ``0o666 & ~umask`` like any newly created file. On failure (a full disk, an unwritable
    directory) the temporary file is removed and the old ``path``, if any, is left as it was. Rank 0 only."""
    if not distributed.is_main():
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        # mkstemp creates 0600; a result file gets the mode any new file would get (0644 under umask 022).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def write_error(path: Path, e: OSError) -> EsaError:
    """A failed write (full disk, read-only or missing folder) as a one-line error naming the file."""
    return EsaError(f"cannot write {path}: {e.strerror or e} (free some space or choose another --out-dir)")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def round_float(x: float, digits: int = JSON_SIGNIFICANT_DIGITS) -> float:
    """``x`` rounded to ``digits`` significant digits (``9.999999999998899e-05`` → ``0.0001``); ints untouched."""
    return float(f"{x:.{digits}g}")


def _json_safe(obj: Any, digits: int | None = None) -> Any:
    """Replace non-finite floats by strings ("nan", "inf", "-inf") so the file stays standard JSON; with
    ``digits``, round finite floats to that many significant digits."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
        return obj if digits is None else round_float(obj, digits)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v, digits) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _json_safe(obj.item(), digits)
    return obj


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _json_restore(obj: Any) -> Any:
    """Inverse of :func:`_json_safe`: "nan" / "inf" / "-inf" strings become floats again."""
    if isinstance(obj, str):
        return _NON_FINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _json_restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_restore(v) for v in obj]
    return obj


def to_json(obj: Any) -> str:
    """Indented standard JSON; floats rounded to :data:`JSON_SIGNIFICANT_DIGITS` significant digits.

    (``trials.jsonl`` is not rounded: its per-window NLLs are the raw data that statistics are recomputed from.)"""
    return json.dumps(_json_safe(obj, JSON_SIGNIFICANT_DIGITS), indent=2, sort_keys=False, allow_nan=False) + "\n"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj))


def atomic_write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_json(path: Path) -> Any:
    """A JSON file written by :func:`atomic_write_json` (non-finite numbers restored); errors are one line."""
    try:
        return _json_restore(json.loads(Path(path).read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise EsaError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise EsaError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def _drop_torn_tail(path: Path) -> None:
    """Cut a torn last line (no final newline: a run killed mid-append) so the next append starts a clean line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = f.seek(0) or f.read()
        f.truncate(data.rfind(b"\n") + 1)


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and fsync, so a finished trial survives a crash of the next one.

    A crash during the write can leave a torn last line; :func:`read_jsonl` drops it. Rank 0 only.
    """
    if not distributed.is_main():
        return
    line = json.dumps(_json_safe(record), allow_nan=False) + "\n"
    _drop_torn_tail(Path(path))
    size = Path(path).stat().st_size if Path(path).exists() else 0
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        try:  # cut a partly written line off, so that the next append starts on a clean line
            os.truncate(path, size)
        except OSError:
            pass  # read_jsonl still drops a torn final line
        raise write_error(Path(path), e) from None


def atomic_write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Replace a JSON-lines file as a whole (e.g. without the torn tail :func:`read_jsonl` skipped), atomically;
    lines as :func:`append_jsonl` writes them."""
    atomic_write_text(path, "".join(json.dumps(_json_safe(r), allow_nan=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file, ignoring a torn (unparsable) final line left by a crash."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(_json_restore(json.loads(line)))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn tail from an interrupted append
            raise EsaError(f"{path} line {i + 1} is corrupt; delete the run or rerun with --overwrite") from None
    return records


def read_csv_rows(path: Path, required: Sequence[str] = ()) -> list[dict[str, str]]:
    """Rows of a CSV file with a header, as dicts; missing file or columns are one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise EsaError(f"{path} not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise EsaError(f"{path} lacks the column(s) {', '.join(missing)}")
        return list(reader)


def is_finished(run_dir: Path) -> bool:
    manifest = Path(run_dir) / MANIFEST
    if not manifest.exists():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("status") == "complete"
    except (json.JSONDecodeError, OSError):
        return False


def require_same_windows(out_dir: Path, recorded: str | None, current: str) -> None:
    """A resumed run must evaluate the windows its interrupted part did: the token hash its baseline recorded
    (``recorded``) against this run's (``current``)."""
    if recorded != current:
        raise EsaError(f"{out_dir}: the evaluation windows differ from the interrupted run's; use --overwrite")


def finished_profile_run(run_dir: Path, model_id: str | None = None) -> dict:
    """The manifest of the finished profile run given as ``--from-profile`` (a one-line error otherwise); with
    ``model_id``, the run must have profiled that model."""
    if not is_finished(run_dir):
        raise EsaError(f"--from-profile {run_dir} is not a finished profile run")
    manifest = read_json(Path(run_dir) / MANIFEST)
    profiled = manifest.get("model", {}).get("model_id")
    if model_id is not None and profiled != model_id:
        raise EsaError(f"--from-profile {run_dir} profiled {profiled!r}, not {model_id!r}; pass the same --model")
    return manifest


def check_writable(folder: Path, option: str = "--out-dir") -> None:
    """Fail before any slow work when ``folder`` could not be created or written: its nearest existing
    ancestor must be a writable directory."""
    ancestor = Path(folder).absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise EsaError(f"{option} {folder} cannot be created: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise EsaError(f"{option} {folder} is not writable (no write permission on {ancestor})")


def prepare_run_dir(run_dir: Path, *, overwrite: bool) -> Path:
    """Check that results may be written to ``run_dir``; create nothing yet.

    A finished run is never replaced silently: ``overwrite=True`` is required. An unfinished directory is
    accepted: its files are replaced as new results are written (``esa perturb`` resumes from its trials).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise EsaError(f"--out-dir {run_dir} exists and is not a directory")
    check_writable(run_dir)
    if run_dir.is_dir() and is_finished(run_dir) and not overwrite:
        raise EsaError(f"{run_dir} already holds a finished run; pass --overwrite to replace it or choose another --out-dir")
    distributed.barrier()  # every rank has looked before rank 0 changes anything
    return run_dir


def prepare_resumable_run(run_dir: Path, config: Any, *, overwrite: bool, marker: str, command: str,
                          ignore: tuple[str, ...] = ("overwrite",)) -> tuple[Path, bool]:
    """(run directory, resuming?) for a command that resumes (``esa perturb``, ``esa validate``): a finished run
    needs ``overwrite``; an unfinished one holding ``marker`` and a ``config.json`` that describes ``config``
    (top-level keys in ``ignore`` aside) resumes; one with another configuration is refused."""
    run_dir = prepare_run_dir(Path(run_dir), overwrite=overwrite)
    if overwrite or not (run_dir / marker).exists() or not (run_dir / "config.json").exists():
        return run_dir, False
    if not same_config(read_json(run_dir / "config.json"), config, ignore=ignore):
        raise EsaError(f"{run_dir} holds an unfinished {command} run with another configuration; pass --overwrite "
                       "to discard it or choose another --out-dir")
    return run_dir, True


def begin_run(run_dir: Path, overwrite: bool) -> None:
    """Mark the directory unfinished before new results replace old ones (so a crash cannot mix two runs):
    with ``overwrite``, the finished run's manifest is removed; the new one is written last."""
    manifest = Path(run_dir) / MANIFEST
    if overwrite and manifest.exists():
        manifest.unlink()


def clear_run_files(run_dir: Path, names: Iterable[str]) -> None:
    """Remove files of a previous run that ``--overwrite`` replaces (only the named ones, never the folder);
    rank 0 only."""
    if not distributed.is_main():
        return
    for name in names:
        p = Path(run_dir) / name
        if p.is_file():
            p.unlink()
