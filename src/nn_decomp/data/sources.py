"""Where a run's activations come from, chosen in one place by `data.source`: an activation cache
(`data=cache`, cached.py), a planted synthetic model (`data=synthetic`, synthetic.py) or the LM
(store.py; with `data.background=true` in its own process, background.py). Every training stream
has one interface: `next_batch`, `skip`, `close`, `batch_size`."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import torch
from omegaconf import DictConfig
from torch import Tensor

from nn_decomp.data.background import BackgroundStore
from nn_decomp.data.cached import open_cache
from nn_decomp.data.synthetic import SyntheticData
from nn_decomp.runtime.distributed import DistInfo

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


class Source(NamedTuple):
    """What a run trains and evaluates on."""

    model: HookedTransformer | None
    """The LM (None when the data needs none: cache, synthetic)."""
    store: object
    """The training stream of this rank's rows."""
    eval_set: tuple[Tensor, Tensor] | None
    """Fixed held-out (x_NLD, y_NLD); None where not asked for."""


def take_tokens(store, n_tokens: int) -> tuple[Tensor, Tensor]:
    """Whole batches of `store` (at least one) adding up to at most n_tokens rows, concatenated."""
    batches = [store.next_batch() for _ in range(max(n_tokens // store.batch_size, 1))]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def open_source(cfg: DictConfig, model: HookedTransformer | None, device: torch.device, rows: DistInfo,
                main: bool) -> Source:
    """The training stream of the data shard `rows` (batches of train.batch_size / rows.world_size)
    and, when `main`, the held-out set. `model` replaces the LM that `cfg.model` names (unused
    without an LM); the LM is loaded (and imported) only for text data."""
    if cfg.data.source == "cache":
        return Source(None, *open_cache(cfg, device, rows, main))
    if cfg.data.source == "synthetic":
        store = SyntheticData.for_run(cfg, device, rows.rank, rows.world_size)
        return Source(None, store, store.eval_rows(cfg.train.eval_tokens)[:2] if main else None)
    return lm_source(cfg, model, device, rows, main)


def lm_source(cfg: DictConfig, model: HookedTransformer | None, device: torch.device, rows: DistInfo,
              main: bool) -> Source:
    """The LM's activations over `cfg.data`'s text (fails fast on bad hooks or layers)."""
    from nn_decomp.data.store import lm_stores, lm_train_store  # transformer_lens, datasets: ~10 s, cache runs skip it

    batch_size = cfg.train.batch_size // rows.world_size
    lm = lm_stores(cfg, model, device, batch_size, rows)
    eval_set = take_tokens(lm.eval, cfg.train.eval_tokens) if main else None
    if not cfg.data.background:
        return Source(lm.model, lm.train, eval_set)
    # a CUDA LM cannot be forked: a spawned process loads its own copy and builds the same store
    lm_on_gpu = next(lm.model.parameters()).device.type == "cuda"
    recipe = functools.partial(lm_train_store, cfg, batch_size, rows, device) if lm_on_gpu else None
    store = BackgroundStore(lm.train, cfg.data.background_slots, cfg.data.background_threads, recipe)
    return Source(lm.model, store, eval_set)
