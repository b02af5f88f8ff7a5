"""The first steps every command shares: load the model, load the text, cut the evaluation windows."""

from __future__ import annotations

from dataclasses import dataclass

from esa.config import DataConfig, ModelConfig, resolve_seq_len, validate_data
from esa.corpus import Corpus, load_corpus
from esa.modeling import LoadedModel, load_model
from esa.windows import Windows, make_windows, tokenize


@dataclass
class Session:
    loaded: LoadedModel
    corpus: Corpus
    windows: Windows

    def describe(self) -> dict:
        return {"model": self.loaded.describe(), "dataset": self.corpus.info, "windows": self.windows.describe()}


def open_session(model_cfg: ModelConfig, data: DataConfig) -> Session:
    """Load model and text and cut windows of ``resolve_seq_len(data, model context)``; ``data`` is left as is
    (a run records the resolved value itself: see :func:`esa.config.resolve_seq_len`)."""
    validate_data(data)
    corpus = load_corpus(data.dataset, text_file=data.text_file, dataset_path=data.dataset_path)
    loaded = load_model(model_cfg.model, dtype=model_cfg.dtype, device=model_cfg.device, revision=model_cfg.revision,
                        trust_remote_code=model_cfg.trust_remote_code,
                        attn_implementation=model_cfg.attn_implementation, device_map=model_cfg.device_map,
                        max_memory=model_cfg.max_memory)
    return session_for(loaded, data, corpus)


def session_for(loaded: LoadedModel, data: DataConfig, corpus: Corpus | None = None) -> Session:
    """A session around a model already loaded (``esa.api`` with a model object): load the text (unless given) and
    cut the windows, with ``data.seq_len`` resolved when it was left to the default (``data`` is not changed)."""
    validate_data(data)
    if corpus is None:
        corpus = load_corpus(data.dataset, text_file=data.text_file, dataset_path=data.dataset_path)
    data = resolve_seq_len(data, loaded.max_positions)
    ids = tokenize(loaded.tokenizer, corpus.text)
    windows = make_windows(ids, data.seq_len, max_samples=data.max_samples, seed=data.seed,
                           max_positions=loaded.max_positions)
    return Session(loaded=loaded, corpus=corpus, windows=windows)
