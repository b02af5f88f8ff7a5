"""The embedded tiny model: a Llama-architecture model with grouped-query attention, trained by ``esa tiny train``
on the documentation text that every Python installation carries (see :mod:`esa.tiny.corpus`).

It exists so that esa runs, and is tested, on a real trained language model with no network and no GPU.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
