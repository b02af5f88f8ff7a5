"""The first steps every command shares: load the model, load the text, cut the evaluation windows."""

from __future__ import annotations

from dataclasses import dataclass

from esa.config import DataConfig, ModelConfig
from esa.corpus import Corpus, load_corpus
from esa.errors import EsaError
from esa.modeling import LoadedModel, load_model
from esa.windows import Windows, default_seq_len, make_windows, tokenize


@dataclass
class Session:
    loaded: LoadedModel
    corpus: Corpus
    windows: Windows

    def describe(self) -> dict:
        return {"model": self.loaded.describe(), "dataset": self.corpus.info, "windows": self.windows.describe()}


def validate_data_config(data: DataConfig) -> None:
    """Checks that need neither the model nor the text, so bad flags fail before anything slow happens."""
    if data.max_samples is not None and data.max_samples < 1:
        raise EsaError(f"--max-samples must be at least 1 (got {data.max_samples})")
    if data.batch_size < 1:
        raise EsaError(f"--batch-size must be at least 1 (got {data.batch_size})")
    if data.seq_len is not None and data.seq_len < 2:
        raise EsaError(f"--seq-len must be at least 2 (got {data.seq_len})")


def open_session(model_cfg: ModelConfig, data: DataConfig) -> Session:
    """Load model and text and cut windows; fills in ``data.seq_len`` when it was left to the default."""
    validate_data_config(data)
    corpus = load_corpus(data.dataset, text_file=data.text_file, dataset_path=data.dataset_path)
    loaded = load_model(model_cfg.model, dtype=model_cfg.dtype, device=model_cfg.device, revision=model_cfg.revision,
                        trust_remote_code=model_cfg.trust_remote_code,
                        attn_implementation=model_cfg.attn_implementation)
    return session_for(loaded, data, corpus)


def session_for(loaded: LoadedModel, data: DataConfig, corpus: Corpus | None = None) -> Session:
    """A session around a model already loaded (``esa.api`` with a model object): load the text (unless given) and
    cut the windows; fills in ``data.seq_len`` when it was left to the default."""
    validate_data_config(data)
    if corpus is None:
        corpus = load_corpus(data.dataset, text_file=data.text_file, dataset_path=data.dataset_path)
    if data.seq_len is None:
        data.seq_len = default_seq_len(loaded.max_positions)
    ids = tokenize(loaded.tokenizer, corpus.text)
    windows = make_windows(ids, data.seq_len, max_samples=data.max_samples, seed=data.seed,
                           max_positions=loaded.max_positions)
    return Session(loaded=loaded, corpus=corpus, windows=windows)
