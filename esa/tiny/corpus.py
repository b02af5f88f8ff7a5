"""Text that every CPython installation already holds: the standard library's documentation.

Documents, in a fixed order:
- every topic of ``pydoc_data.topics`` (the help() pages of the language reference), id ``topic:<name>``;
- the docstrings (module, class, function) of every ``.py`` module of the standard library, packages included but
  tests, IDLE, tkinter, lib2to3 and site-packages left out, read with ``ast`` (nothing is imported or executed),
  id ``module:<dotted.name>``.

A document is held out for evaluation when ``crc32(id) % 10 == 0`` (about 10% of the text): the split depends only
on the document's name, so it is the same on every machine, and the training command never sees held-out text.
The exact text differs a little between Python versions; run manifests record a hash of the evaluated token ids.
"""

from __future__ import annotations

import ast
import sysconfig
import zlib
from pathlib import Path

HELD_OUT_MODULUS = 10
SEPARATOR = "\n\n"


def _topics() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return []
    return [(f"topic:{name}", topics[name].strip()) for name in sorted(topics)]


_SKIP = {"site-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo", "tkinter", "ensurepip"}


def _module_docstrings() -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if _SKIP.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(doc.strip())
        if parts:
            name = ".".join(rel.with_suffix("").parts)
            docs.append((f"module:{name}", SEPARATOR.join(parts)))
    return docs


def documents() -> list[tuple[str, str]]:
    """All (id, text) documents of the corpus, in a fixed order."""
    return _topics() + _module_docstrings()


def is_held_out(doc_id: str) -> bool:
    return zlib.crc32(doc_id.encode("utf-8")) % HELD_OUT_MODULUS == 0


def split_text(split: str) -> str:
    """The training (``"train"``) or held-out evaluation (``"eval"``) text, documents joined by blank lines."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    want_eval = split == "eval"
    return SEPARATOR.join(text for doc_id, text in documents() if is_held_out(doc_id) == want_eval)
