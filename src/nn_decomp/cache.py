"""Activation caches: run the LM once, train many dictionaries from the stored activations.

    python -m nn_decomp.cache model=… data=… arch=… cache.n_tokens=… [cache.path=…] [cache.dtype=…]
    python -m nn_decomp.train data=cache model=… arch=… [data.path=…] --multirun act.k=8,16,32,64

File layout (HDF5, one file, written to a temp file and renamed into place when complete):
- `train/<hook>` [n_tokens, d] and `eval/<hook>` [n_eval, d]: one dataset per hook (name
  %-escaped), chunked by `chunk_rows` rows with a Fletcher-32 checksum per chunk, stored as float16,
  float32 or bfloat16 (as its uint16 bit pattern). Row i of every dataset is the same token.
- train rows come from the ActivationsStore (the hooks the arch needs, BOS/EOS/pad dropped) in
  chunks of `chunk_rows` drawn from its shuffled buffer of `cache.shuffle_tokens` rows, so every
  chunk is a random sample of a window of many contexts: reading whole chunks in random order is
  well mixed. eval rows are the LM path's eval set: the first batches from the held-out documents.
- root attrs: format, model, hooks, hooks_in, hooks_out, n_tokens, n_eval, dtype, chunk_rows,
  mean_sq_norm (JSON {hook: E‖x‖²} over the train rows, as stored), text_source (JSON of the data
  config the text came from), context_size, prepend_bos, seed; each dataset has hook, mean_sq_norm.

Reading (`CachedActivations`): the train chunks are dealt, in a random order per epoch, to
`data.streams` streams; batch i takes rows [i·b, (i+1)·b) of every stream (b = batch_size/streams),
with each chunk's rows permuted again as it is loaded. Everything is a function of (seed, i), so a
resumed run seeks straight to its batch, and data-parallel ranks split the streams: rank r reads only
its streams' chunks, and the concatenation over ranks is the one-process batch.
"""
import json
import queue
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import h5py
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

from nn_decomp.config import UsageError, require, validate
from nn_decomp.config.arch import arch_hooks
from nn_decomp.config.data import CacheConfig
from nn_decomp.runtime.distributed import SINGLE, DistInfo, rank_device
from nn_decomp.runtime.files import replacing
from nn_decomp.runtime.jobs import exit_on_usage_error

FORMAT = "nn_decomp.activations/1"  # a file format's name, not a module path: never renamed
# The same format under the name that the package regroup (76d6700) wrote by mistake: still readable.
READABLE_FORMATS = (FORMAT, "nn_decomp.core.activations/1")
BUILD = "python -m nn_decomp.cache"
FLOAT16_MAX = 65504.0


class CacheError(UsageError, OSError):
    """The cache file is missing, truncated, corrupted or not a cache."""


def escape(hook: str) -> str:
    """A hook name as an HDF5 dataset name ('/' would make groups)."""
    return quote(hook, safe="")


# --- storage types ----------------------------------------------------------------------------

def to_storage(rows_ND: Tensor, dtype: str, hook: str) -> np.ndarray:
    """Rows in the cache's on-disk type; bfloat16 keeps its bit pattern in a uint16."""
    rows_ND = rows_ND.detach().cpu()
    if dtype == "bfloat16":
        return rows_ND.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if dtype == "float16" and rows_ND.abs().max() > FLOAT16_MAX:
        raise ValueError(f"activations at {hook} reach {rows_ND.abs().max():.4g}, beyond float16's range: "
                         "use cache.dtype=bfloat16 or cache.dtype=float32")
    return rows_ND.to(getattr(torch, dtype)).numpy()


def from_storage(array: np.ndarray, dtype: str) -> Tensor:
    """The stored rows as a torch tensor of the stored type (no copy)."""
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


# --- metadata ---------------------------------------------------------------------------------

@dataclass
class CacheMeta:
    """What a cache holds; read from the file's attributes by `read_meta`."""

    path: Path
    model: str
    hooks: list[str]
    """Every stored hook (hooks_in, then the hooks_out not among them)."""
    hooks_in: list[str]
    hooks_out: list[str]
    n_tokens: int
    """Training rows (a multiple of chunk_rows)."""
    n_eval: int
    """Held-out rows, from documents the training rows never saw."""
    dtype: str
    chunk_rows: int
    mean_sq_norm: dict[str, float]
    """E‖x‖² per hook over the training rows, as stored."""
    text_source: dict
    """The data config the text came from (source, path, name, split, column, …)."""
    context_size: int
    prepend_bos: bool
    seed: int

    @property
    def n_chunks(self) -> int:
        return self.n_tokens // self.chunk_rows


def unreadable(path: Path, why: str) -> CacheError:
    return CacheError(f"activation cache {path} is unreadable ({why}): the file is truncated or corrupted. "
                      f"Delete it and rebuild it with `{BUILD} …` (cache.path={path})")


def read_meta(path: str | Path) -> CacheMeta:
    """The metadata of the cache at `path`, after checking that the file is complete."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"activation cache {path} does not exist: build it with "
                         f"`{BUILD} model=… arch=… data=…` (writes cache.path) or fix data.path")
    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            if a.get("format") not in READABLE_FORMATS:
                raise CacheError(f"{path} is not an nn_decomp activation cache (format {a.get('format')!r}, "
                                 f"expected {FORMAT!r}); build one with `{BUILD}`")
            hooks = {key: [str(h) for h in a[key]] for key in ("hooks", "hooks_in", "hooks_out")}
            meta = CacheMeta(path, str(a["model"]), hooks["hooks"], hooks["hooks_in"], hooks["hooks_out"],
                             int(a["n_tokens"]), int(a["n_eval"]), str(a["dtype"]), int(a["chunk_rows"]),
                             json.loads(a["mean_sq_norm"]), json.loads(a["text_source"]), int(a["context_size"]),
                             bool(a["prepend_bos"]), int(a["seed"]))
            for split, n in (("train", meta.n_tokens), ("eval", meta.n_eval)):
                for hook in meta.hooks:
                    name = f"{split}/{escape(hook)}"
                    if name not in f or f[name].shape[0] != n:
                        raise unreadable(path, f"dataset {name} is missing or has the wrong number of rows")
    except CacheError:
        raise
    except (OSError, KeyError) as err:
        raise unreadable(path, f"{type(err).__name__}: {err}") from err
    return meta


def check_matches(meta: CacheMeta, model: str, hooks_in: list[str], hooks_out: list[str]) -> None:
    """Refuse a cache built for another model or other hooks, naming what differs."""
    differences = []
    if meta.model != model:
        differences.append(f"model: the cache has {meta.model!r}, the run asks for {model!r} (model.name)")
    missing = [h for h in [*hooks_in, *hooks_out] if h not in meta.hooks]
    if missing:
        differences.append(f"hooks: the run needs {missing} (arch), the cache holds {meta.hooks}")
    if differences:
        raise UsageError(f"activation cache {meta.path} does not match this run: " + "; ".join(differences)
                         + f". Build a matching one with `{BUILD}` and the same model/arch overrides, "
                         "or point data.path at one")


# --- writing ----------------------------------------------------------------------------------

def build_cache(cfg: DictConfig, model=None) -> CacheMeta:
    """Run the LM over `cfg.data` and write the activations at `cfg.arch`'s hooks to `cfg.cache.path`.
    `model` replaces the LM that `cfg.model` names (tests pass a tiny one)."""
    from nn_decomp.data.store import lm_stores  # imports transformer_lens (~10 s): the reader never needs it

    validate(cfg)
    cc: CacheConfig = OmegaConf.to_object(cfg.cache)
    require(cfg.data.source != "cache", "data=cache reads a cache: build one from text (data=sotu, text or hf)")
    torch.manual_seed(cfg.train.seed)
    lm = lm_stores(cfg, model, rank_device(cfg.train.device, SINGLE), cc.chunk_rows, buffer_tokens=cc.shuffle_tokens)
    n_chunks = -(-cc.n_tokens // cc.chunk_rows)
    # The LM path's eval set (train.take_tokens on the eval store): whole batches, at least one.
    n_eval_batches = max(cc.eval_tokens // lm.eval.batch_size, 1)
    lm.train.max_tokens = n_chunks * cc.chunk_rows  # no LM forward for rows past the last chunk
    hooks_in, hooks_out = arch_hooks(cfg.arch)
    path = Path(cc.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, h5py.File(tmp, "w") as f:
        n_tokens, sq_sums = _write_split(f, "train", lm.train, n_chunks, cc, hooks_in, hooks_out)
        n_eval, _ = _write_split(f, "eval", lm.eval, n_eval_batches, cc, hooks_in, hooks_out)
        mean_sq = {h: s / n_tokens for h, s in sq_sums.items()}
        for hook, value in mean_sq.items():
            f[f"train/{escape(hook)}"].attrs["mean_sq_norm"] = value
        data = OmegaConf.to_container(cfg.data, resolve=True)
        f.attrs.update(format=FORMAT, model=cfg.model.name, hooks=list(sq_sums), hooks_in=hooks_in,
                       hooks_out=hooks_out, n_tokens=n_tokens, n_eval=n_eval, dtype=cc.dtype,
                       chunk_rows=cc.chunk_rows, mean_sq_norm=json.dumps(mean_sq), text_source=json.dumps(data),
                       context_size=cfg.data.context_size, prepend_bos=cfg.data.prepend_bos, seed=cfg.train.seed)
    return read_meta(path)


def _write_split(f: h5py.File, split: str, store, n_batches: int, cc: CacheConfig, hooks_in, hooks_out):
    """Write up to n_batches of `store`'s batches as consecutive rows; returns (rows, {hook: Σ‖x‖²})."""
    storage = np.uint16 if cc.dtype == "bfloat16" else np.dtype(cc.dtype)
    dsets, sq_sums, n = {}, {}, 0
    for i in tqdm(range(n_batches), desc=f"cache {split}", mininterval=2):
        try:
            x_BLD, y_BLD = store.next_batch()
        except StopIteration:
            warnings.warn(f"{split}: the text ran out after {n} rows ({i} of {n_batches} batches of "
                          f"{store.batch_size}); the cache holds {n} {split} rows")
            break
        rows = dict(zip(hooks_out, y_BLD.unbind(1))) | dict(zip(hooks_in, x_BLD.unbind(1)))
        for hook in [*hooks_in, *[h for h in hooks_out if h not in hooks_in]]:
            stored = to_storage(rows[hook], cc.dtype, hook)
            if hook not in dsets:
                d = stored.shape[1]
                dsets[hook] = f.create_dataset(
                    f"{split}/{escape(hook)}", shape=(n_batches * len(stored), d), maxshape=(None, d),
                    chunks=(min(cc.chunk_rows, n_batches * len(stored)), d), dtype=storage, fletcher32=True)
                dsets[hook].attrs["hook"] = hook
                sq_sums[hook] = 0.0
            dsets[hook][n:n + len(stored)] = stored
            sq_sums[hook] += from_storage(stored, cc.dtype).double().pow(2).sum().item()
        n += len(x_BLD)
    if n == 0:
        raise ValueError(f"the text yields no {split} rows: use more text (data) or a smaller "
                         f"{'cache.chunk_rows' if split == 'train' else 'train.batch_size'}")
    for ds in dsets.values():
        ds.resize(n, axis=0)
    return n, sq_sums


# --- reading ----------------------------------------------------------------------------------

def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + key) % (1 << 62)
    return torch.Generator().manual_seed(seed)


def read_rows(f: h5py.File, meta: CacheMeta, split: str, hooks: list[str], start: int, stop: int) -> Tensor:
    """[stop − start, len(hooks), d] float32 rows of `split`."""
    out = None
    for i, hook in enumerate(hooks):
        name = f"{split}/{escape(hook)}"
        try:
            array = f[name][start:stop]
        except OSError as err:  # a Fletcher-32 mismatch or a short read
            raise unreadable(meta.path, f"rows {start}:{stop} of {name}: {err}") from err
        if out is None:
            out = torch.empty(len(array), len(hooks), array.shape[1])
        out[:, i] = from_storage(array, meta.dtype)
    return out


def read_eval_set(meta: CacheMeta, hooks_in, hooks_out, n_tokens: int, device) -> tuple[Tensor, Tensor]:
    """The first n_tokens held-out rows (x_NLD, y_NLD) on `device`."""
    if n_tokens > meta.n_eval:
        raise UsageError(f"train.eval_tokens asks for {n_tokens} eval rows but {meta.path} holds {meta.n_eval}: "
                         f"lower train.eval_tokens or rebuild with cache.eval_tokens={n_tokens}")
    with h5py.File(meta.path, "r") as f:
        x_NLD = read_rows(f, meta, "eval", hooks_in, 0, n_tokens).to(device)
        y_NLD = x_NLD if hooks_in == hooks_out else read_rows(f, meta, "eval", hooks_out, 0, n_tokens).to(device)
    return x_NLD, y_NLD


class _Chunk:
    __slots__ = ("q", "stream", "x", "y")

    def __init__(self, q: int, stream: int, x: Tensor, y: Tensor):
        self.q, self.stream, self.x, self.y = q, stream, x, y


class CachedActivations:
    """Iterator of (x_BLD, y_BLD) batches from an activation cache: ActivationsStore's interface.

    Rows are float32 on `device`; y_BLD is x_BLD when hooks_in == hooks_out. Each of `streams`
    streams is a sequence of whole chunks: epoch e deals a seeded permutation of the chunks round
    robin to the streams (dropping the n_chunks % streams left over, different ones each epoch),
    and each chunk's rows are permuted again when loaded. A batch is b = batch_size / streams rows
    from every stream, in stream order. Epochs follow each other without end.

    With world_size ranks (streams % world_size == 0) rank r owns streams [r·S/W, (r+1)·S/W),
    reads only their chunks and yields batch_size / world_size rows per batch; concatenated over
    ranks the batches are those of one process.

    A background thread loads the chunks in the order they will be needed into a queue of
    `prefetch_chunks`; it starts on the first `next_batch`, so `skip` before reading costs nothing.
    """

    def __init__(self, meta: CacheMeta, hooks_in: list[str], hooks_out: list[str], batch_size: int,
                 device: torch.device | str, streams: int = 8, rank: int = 0, world_size: int = 1,
                 seed: int = 0, prefetch_chunks: int = 16):
        require(batch_size % streams == 0,
                f"train.batch_size={batch_size} must be a multiple of data.streams={streams}")
        require(streams % world_size == 0,
                f"data.streams={streams} must be a multiple of the {world_size} ranks: "
                f"set data.streams={world_size}·n")
        if meta.n_chunks < streams:
            raise UsageError(f"{meta.path} has {meta.n_chunks} chunks, fewer than data.streams={streams}: "
                             "lower data.streams or build the cache with a smaller cache.chunk_rows")
        self.meta, self.hooks_in, self.hooks_out = meta, list(hooks_in), list(hooks_out)
        self.autoencode = self.hooks_in == self.hooks_out
        self.n_streams, self.seed, self.prefetch_chunks = streams, seed, prefetch_chunks
        per_rank = streams // world_size
        self.my_streams = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.rows_per_stream = batch_size // streams
        self.batch_size = self.rows_per_stream * per_rank  # rows this rank yields per batch
        self.chunks_per_epoch = meta.n_chunks // streams  # per stream
        self.device = torch.device(device)
        self.batch_index = 0
        self.chunks_read = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch_chunks)
        self._loaded: dict[tuple[int, int], _Chunk] = {}

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return self.next_batch()

    @property
    def epoch(self) -> float:
        return self.batch_index * self.rows_per_stream / (self.chunks_per_epoch * self.meta.chunk_rows)

    def epoch_order(self, epoch: int) -> Tensor:
        """[chunks_per_epoch, streams]: entry [k, s] is the k-th chunk stream s reads in this epoch."""
        perm = torch.randperm(self.meta.n_chunks, generator=_generator(self.seed, epoch))
        return perm[: self.chunks_per_epoch * self.n_streams].view(self.chunks_per_epoch, self.n_streams)

    def skip(self, n_batches: int) -> None:
        """Advance past n batches without reading them."""
        self._stop_reader()
        self.batch_index += n_batches

    def next_batch(self) -> tuple[Tensor, Tensor]:
        if self._thread is None:
            self._start_reader()
        R, b = self.meta.chunk_rows, self.rows_per_stream
        first = self.batch_index * b  # the same row offset in every stream
        self._loaded = {key: c for key, c in self._loaded.items() if key[0] >= first // R}
        xs, ys = [], []
        for stream in self.my_streams:
            pos = first
            while pos < first + b:
                chunk = self._chunk(pos // R, stream)
                n = min(R - pos % R, first + b - pos)
                xs.append(chunk.x[pos % R: pos % R + n])
                ys.append(chunk.y[pos % R: pos % R + n])
                pos += n
        self.batch_index += 1
        x_BLD = torch.cat(xs).to(self.device)
        return (x_BLD, x_BLD) if self.autoencode else (x_BLD, torch.cat(ys).to(self.device))

    def close(self) -> None:
        self._stop_reader()

    def _chunk(self, q: int, stream: int) -> _Chunk:
        """Chunk q of `stream` (q counts over epochs), from the reader's queue."""
        while (q, stream) not in self._loaded:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._stop_reader()
                raise item
            self._loaded[item.q, item.stream] = item
        return self._loaded[q, stream]

    def _start_reader(self) -> None:
        self._stop.clear()
        start_q = self.batch_index * self.rows_per_stream // self.meta.chunk_rows
        self._thread = threading.Thread(target=self._read_ahead, args=(start_q,), daemon=True,
                                        name=f"cache-reader:{self.meta.path.name}")
        self._thread.start()

    def _stop_reader(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a put on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)
        self._queue = queue.Queue(maxsize=self.prefetch_chunks)
        self._thread, self._loaded = None, {}

    def _read_ahead(self, q: int) -> None:
        """Reader thread: load this rank's chunks in the order next_batch will ask for them."""
        try:
            with h5py.File(self.meta.path, "r") as f:
                while not self._stop.is_set():
                    epoch, k = divmod(q, self.chunks_per_epoch)
                    order = self.epoch_order(epoch)
                    for stream in self.my_streams:
                        self._put(self._load(f, q, stream, epoch, int(order[k, stream])))
                        if self._stop.is_set():
                            return
                    q += 1
        except BaseException as err:  # handed to the trainer, which raises it
            self._put(err if isinstance(err, CacheError) else unreadable(self.meta.path, repr(err)))

    def _load(self, f: h5py.File, q: int, stream: int, epoch: int, chunk: int) -> _Chunk:
        R = self.meta.chunk_rows
        perm = torch.randperm(R, generator=_generator(self.seed, epoch, chunk))
        x = read_rows(f, self.meta, "train", self.hooks_in, chunk * R, (chunk + 1) * R)[perm]
        y = x if self.autoencode else read_rows(f, self.meta, "train", self.hooks_out, chunk * R, (chunk + 1) * R)[perm]
        self.chunks_read += 1
        return _Chunk(q, stream, x, y)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


def open_cache(cfg: DictConfig, device: torch.device, info: DistInfo = SINGLE):
    """The training stream and the eval set (rank 0 only; None elsewhere) of a `data=cache` run,
    after checking that the cache at data.path holds this run's model and hooks."""
    hooks_in, hooks_out = arch_hooks(cfg.arch)
    meta = read_meta(cfg.data.path)
    check_matches(meta, cfg.model.name, hooks_in, hooks_out)
    B = cfg.train.batch_size
    store = CachedActivations(meta, hooks_in, hooks_out, B, device, cfg.data.streams, info.rank, info.world_size,
                              cfg.train.seed, cfg.data.prefetch_chunks)
    # As many eval rows as the LM path's take_tokens(eval_store, eval_tokens) gives.
    n_eval = max(cfg.train.eval_tokens // B, 1) * B
    eval_set = read_eval_set(meta, hooks_in, hooks_out, n_eval, device) if info.is_main else None
    return meta, store, eval_set


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    meta = exit_on_usage_error(build_cache, cfg)
    print(f"wrote {meta.n_tokens} train + {meta.n_eval} eval rows of {meta.hooks} ({meta.dtype}) to {meta.path}\n"
          f"train from it: python -m nn_decomp.train data=cache data.path={meta.path} "
          f"model.name={meta.model} arch=… (the same arch overrides)")


if __name__ == "__main__":
    main()
