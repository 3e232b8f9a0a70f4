"""`data=cache`: training batches from an activation cache (`data/cache_file.py`), read by a
background thread.

The train chunks are dealt, in a random order per epoch, to `data.streams` streams; batch i takes
rows [i·b, (i+1)·b) of every stream (b = batch_size/streams), with each chunk's rows permuted again
as it is loaded. Everything is a function of (seed, i), so a resumed run seeks straight to its
batch, and data-parallel ranks split the streams: rank r reads only its streams' chunks, and the
concatenation over ranks is the one-process batch.
"""
import queue
import threading

import h5py
import torch
from omegaconf import DictConfig
from torch import Tensor

from nn_decomp.config import UsageError, require
from nn_decomp.config.arch import arch_hooks
from nn_decomp.data.cache_file import (CacheError, CacheMeta, check_matches, read_eval_set, read_meta, read_rows,
                                       unreadable)
from nn_decomp.runtime.distributed import DistInfo


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + key) % (1 << 62)
    return torch.Generator().manual_seed(seed)


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


def open_cache(cfg: DictConfig, device: torch.device, rows: DistInfo,
               main: bool) -> tuple[CachedActivations, tuple[Tensor, Tensor] | None]:
    """The training stream (this data shard's `rows`) and the eval set (when `main`; else None) of
    a `data=cache` run, after checking that the cache at data.path holds this run's model and hooks."""
    hooks_in, hooks_out = arch_hooks(cfg.arch)
    meta = read_meta(cfg.data.path)
    check_matches(meta, cfg.model.name, hooks_in, hooks_out)
    B = cfg.train.batch_size
    store = CachedActivations(meta, hooks_in, hooks_out, B, device, cfg.data.streams, rows.rank, rows.world_size,
                              cfg.train.seed, cfg.data.prefetch_chunks)
    # As many eval rows as the LM path's take_tokens(eval_store, eval_tokens) gives.
    n_eval = max(cfg.train.eval_tokens // B, 1) * B
    return store, read_eval_set(meta, hooks_in, hooks_out, n_eval, device) if main else None
