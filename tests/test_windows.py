"""Windows: the standard protocol, seeded subsets, and clear errors."""

import pytest
import torch

from esa.corpus import load_corpus, wikitext2_rows
from esa.errors import EsaError
from esa.config import default_seq_len
from esa.windows import make_windows, seeded_subset


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(103)
    w = make_windows(ids, 10)
    assert w.n == 10 and w.n_available == 10
    assert torch.equal(w.input_ids.flatten(), torch.arange(100))
    assert w.window_index == list(range(10))


def test_seeded_subset_is_reproducible_and_recorded():
    ids = torch.arange(1000)
    a = make_windows(ids, 10, max_samples=7, seed=3)
    b = make_windows(ids, 10, max_samples=7, seed=3)
    c = make_windows(ids, 10, max_samples=7, seed=4)
    assert a.window_index == b.window_index and a.window_index != c.window_index
    assert a.window_index == sorted(a.window_index) and len(set(a.window_index)) == 7
    for row, k in zip(a.input_ids, a.window_index):
        assert torch.equal(row, torch.arange(10 * k, 10 * k + 10))
    assert a.describe()["window_index"] == a.window_index
    assert a.token_sha256() == b.token_sha256() != c.token_sha256()


def test_seeded_subset_helper():
    assert seeded_subset(10, 10, 0) == list(range(10))
    assert len(seeded_subset(100, 5, 1)) == 5


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_len=500), "larger than the text"),
    (dict(seq_len=10, max_samples=0), "at least 1"),
    (dict(seq_len=1), "at least 2"),
    (dict(seq_len=64, max_positions=32), "exceeds the model's context"),
])
def test_bad_window_arguments(kwargs, match):
    with pytest.raises(EsaError, match=match):
        make_windows(torch.arange(200), **kwargs)


def test_default_seq_len_is_capped():
    assert default_seq_len(131072) == 2048
    assert default_seq_len(256) == 256
    assert default_seq_len(None) == 2048


def test_wikitext2_rows_follow_the_dataset_layout():
    raw = " \n = Title = \n \n Text line .\n"
    rows = wikitext2_rows(raw)
    assert rows == ["", " = Title = \n", "", " Text line .\n"]
    assert "\n\n".join(rows) == "\n\n = Title = \n\n\n\n\n Text line .\n"


def test_corpus_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(EsaError, match="is empty"):
        load_corpus(text_file=empty)
    with pytest.raises(EsaError, match="no such file"):
        load_corpus(text_file=tmp_path / "missing.txt")
    with pytest.raises(EsaError, match="no wiki.test.raw"):
        load_corpus("wikitext2", dataset_path=tmp_path)
    with pytest.raises(EsaError, match="unknown --dataset"):
        load_corpus("c4")


def test_embedded_corpus_is_held_out_from_training():
    from esa.tiny import corpus

    docs = corpus.documents()
    held = [d for d, _ in docs if corpus.is_held_out(d)]
    assert 0.04 < len(held) / len(docs) < 0.2
    eval_text = corpus.split_text("eval")
    train_text = corpus.split_text("train")
    assert eval_text and train_text
    # No held-out document appears in the training text.
    for doc_id, text in docs:
        if corpus.is_held_out(doc_id) and len(text) > 200:
            assert text not in train_text
