"""Evaluation text: the embedded default, a plain text file, or WikiText-2 (raw, test split)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from esa.errors import EsaError

DATASETS = ("embedded", "wikitext2")


@dataclass
class Corpus:
    text: str
    info: dict = field(default_factory=dict)  # dataset id, path, text sha256, for the manifest


def _describe(text: str, **info) -> Corpus:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Corpus(text=text, info={**info, "characters": len(text), "text_sha256": digest})


def wikitext2_rows(raw: str) -> list[str]:
    """Rows of the Hugging Face ``wikitext-2-raw-v1`` test split from the ``wiki.test.raw`` file.

    The dataset has one row per line of the file, keeping the newline, and ``""`` for blank lines. The standard
    perplexity protocol (SparseGPT, Wanda, the Super Weight paper) joins these rows with ``"\\n\\n"``.
    """
    return [line if line.strip() else "" for line in raw.splitlines(keepends=True)]


def _wikitext2(dataset_path: Path | None) -> Corpus:
    if dataset_path is not None:
        path = Path(dataset_path).expanduser()
        raw_file = path / "wiki.test.raw" if path.is_dir() else path
        if not raw_file.is_file():
            raise EsaError(f"--dataset-path {dataset_path}: no wiki.test.raw there (the WikiText-2 raw test split)")
        rows = wikitext2_rows(raw_file.read_text(encoding="utf-8"))
        return _describe("\n\n".join(rows), dataset="wikitext2", split="test", path=str(raw_file.resolve()))
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise EsaError("--dataset wikitext2 needs --dataset-path DIR (holding wiki.test.raw) or `pip install datasets`") from None
    try:
        from datasets import load_dataset

        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as e:  # the datasets library raises many types when offline
        raise EsaError(
            "cannot download WikiText-2 (offline?); pass --dataset-path DIR with wiki.test.raw "
            f"({type(e).__name__}: {' '.join(str(e).split())[:160]})"
        ) from None
    return _describe("\n\n".join(ds["text"]), dataset="wikitext2", split="test", path="hf:wikitext/wikitext-2-raw-v1")


def load_corpus(dataset: str = "embedded", *, text_file: Path | None = None, dataset_path: Path | None = None) -> Corpus:
    """The evaluation text. ``text_file`` wins over ``dataset``; ``embedded`` is the held-out part of the tiny
    model's corpus (:mod:`esa.tiny.corpus`)."""
    if text_file is not None:
        path = Path(text_file).expanduser()
        if not path.is_file():
            raise EsaError(f"--text-file {text_file}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise EsaError(f"--text-file {text_file} is not UTF-8 text") from None
        if not text.strip():
            raise EsaError(f"--text-file {text_file} is empty")
        return _describe(text, dataset="text-file", path=str(path.resolve()))
    if dataset == "wikitext2":
        return _wikitext2(dataset_path)
    if dataset == "embedded":
        from esa.tiny.corpus import split_text

        text = split_text("eval")
        if not text.strip():
            raise EsaError("this Python installation has no standard-library documentation to evaluate on; use --text-file")
        return _describe(text, dataset="embedded", split="eval", path="python-stdlib-docs")
    raise EsaError(f"unknown --dataset {dataset!r}; use one of {', '.join(DATASETS)} or --text-file PATH")
