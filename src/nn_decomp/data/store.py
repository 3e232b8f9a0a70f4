"""Activations of a TransformerLens model, streamed into shuffled (x, y) training batches."""
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import NamedTuple

import torch
from omegaconf import DictConfig
from torch import Tensor
from transformer_lens import HookedTransformer

from nn_decomp.config import UsageError, require
from nn_decomp.config.arch import arch_hooks
from nn_decomp.data.hooks import check_hooks, hook_layer
from nn_decomp.data.text import load_texts, split_documents, token_contexts
from nn_decomp.runtime.distributed import SINGLE, DistInfo, rank_device
from nn_decomp.models import load_model, model_n_layers


class ActivationsStore:
    """Iterator of (x_BLD, y_BLD) batches of activations at hooks_in and hooks_out.

    x_BLD: [batch_size, len(hooks_in), d_in], y_BLD: [batch_size, len(hooks_out), d_out], on
    `device` in `dtype`. When hooks_in == hooks_out (an SAE) activations are computed once and
    y_BLD is the same tensor object as x_BLD.

    Positions whose token id is in exclude_token_ids (BOS, pad) are dropped. Rows go through a
    mixing buffer on the model's device: whenever it is below half of buffer_tokens it is refilled
    (to at least buffer_tokens rows) by running the LM on lm_batch_size contexts at a time, then
    shuffled by a generator seeded with `seed`, so equal seeds give equal batches.

    Once `contexts` is exhausted (or `max_tokens` rows were generated: set it when only that many
    are wanted, so the last refill does not run the LM for rows nobody reads) the buffer is drained
    and then next_batch raises StopIteration (a final partial batch is dropped); the training loop
    decides whether to stop or start over.
    """

    def __init__(
        self,
        model: HookedTransformer,
        contexts: Iterable[torch.LongTensor],
        hooks_in: list[str],
        hooks_out: list[str],
        batch_size: int,
        buffer_tokens: int,
        lm_batch_size: int,
        device: torch.device | str,
        exclude_token_ids: Sequence[int] = (),
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        max_tokens: int | None = None,
    ):
        hooks = [*hooks_in, *hooks_out]
        check_hooks(model, hooks)
        if batch_size > buffer_tokens // 2:
            raise UsageError(
                f"batch_size={batch_size} exceeds half of data.buffer_tokens={buffer_tokens}; "
                f"set data.buffer_tokens >= {2 * batch_size}"
            )
        self.model, self.contexts = model, iter(contexts)
        self.hooks_in, self.hooks_out = list(hooks_in), list(hooks_out)
        self.autoencode = self.hooks_in == self.hooks_out
        self.names = sorted(set(hooks))
        # Blocks after the last hooked one are never needed: stop_at_layer is exclusive.
        self.stop_at_layer = max(hook_layer(h) for h in hooks) + 1
        self.batch_size, self.buffer_tokens, self.lm_batch_size = batch_size, buffer_tokens, lm_batch_size
        self.device, self.dtype = torch.device(device), dtype
        self.lm_device = torch.device(model.cfg.device)
        self.exclude_ids = torch.tensor(list(exclude_token_ids), dtype=torch.long, device=self.lm_device)
        # A CPU generator gives the same permutation whatever device the buffer is on.
        self.generator = torch.Generator().manual_seed(seed)
        self.x_NLD: Tensor | None = None
        self.y_NLD: Tensor | None = None
        self.exhausted = False
        self.tokens_generated, self.max_tokens = 0, max_tokens

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return self.next_batch()

    def skip(self, n_batches: int) -> None:
        """Advance past n batches. The LM stream cannot seek: they are generated and dropped."""
        for _ in range(n_batches):
            self.next_batch()

    def close(self) -> None:
        """Nothing to release (CachedActivations stops its reader thread here)."""

    def next_batch(self) -> tuple[Tensor, Tensor]:
        if self._buffered() < self.buffer_tokens // 2 and not self.exhausted:
            self._refill()
        if self._buffered() < self.batch_size:
            raise StopIteration
        B = self.batch_size
        x_BLD, self.x_NLD = self.x_NLD[:B].to(self.device), self.x_NLD[B:]
        if self.autoencode:
            return x_BLD, x_BLD
        y_BLD, self.y_NLD = self.y_NLD[:B].to(self.device), self.y_NLD[B:]
        return x_BLD, y_BLD

    @torch.no_grad()
    def row_shapes(self) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """(hooks, width) of x's rows and of y's (None for an SAE, whose y is x), from a 1-token pass."""
        _, cache = self.model.run_with_cache(torch.zeros(1, 1, dtype=torch.long, device=self.lm_device),
                                             names_filter=self.names, stop_at_layer=self.stop_at_layer)
        x_shape = (len(self.hooks_in), cache[self.hooks_in[0]].shape[-1])
        return x_shape, None if self.autoencode else (len(self.hooks_out), cache[self.hooks_out[0]].shape[-1])

    def row_bytes(self) -> int:
        """Bytes one buffered row takes: x at every input hook and, unless y is x, y at every output hook."""
        (n_in, d_in), y_shape = self.row_shapes()
        n_out, d_out = y_shape or (0, 0)
        return (n_in * d_in + n_out * d_out) * self.dtype.itemsize

    def _buffered(self) -> int:
        return 0 if self.x_NLD is None else len(self.x_NLD)

    def _refill(self) -> None:
        # The remainder is a view of the last buffer: a copy of it lets that buffer go now.
        xs = [] if self.x_NLD is None else [self.x_NLD.clone()]
        ys = [] if self.y_NLD is None else [self.y_NLD.clone()]
        self.x_NLD = self.y_NLD = None
        n = sum(len(x) for x in xs)
        while n < self.buffer_tokens:
            wanted = self.max_tokens is None or self.tokens_generated < self.max_tokens
            contexts = list(islice(self.contexts, self.lm_batch_size)) if wanted else []
            if not contexts:
                self.exhausted = True
                break
            x_NLD, y_NLD = self._activations(torch.stack(contexts))
            xs.append(x_NLD)
            ys.append(y_NLD)
            n += len(x_NLD)
        if n == 0:
            return
        perm = torch.randperm(n, generator=self.generator).to(self.lm_device)
        self.x_NLD = shuffled(xs, perm)
        self.y_NLD = None if self.autoencode else shuffled(ys, perm)

    @torch.no_grad()
    def _activations(self, tokens_BT: Tensor) -> tuple[Tensor, Tensor]:
        """Kept positions' activations: ([N, len(hooks_in), d_in], [N, len(hooks_out), d_out])."""
        tokens_BT = tokens_BT.to(self.lm_device)
        _, cache = self.model.run_with_cache(
            tokens_BT, names_filter=self.names, stop_at_layer=self.stop_at_layer
        )
        keep_BT = ~torch.isin(tokens_BT, self.exclude_ids)

        def rows(hooks: list[str]) -> Tensor:
            return torch.stack([cache[h] for h in hooks], dim=2)[keep_BT].to(self.dtype)

        x_NLD = rows(self.hooks_in)
        y_NLD = x_NLD if self.autoencode else rows(self.hooks_out)
        self.tokens_generated += len(x_NLD)
        return x_NLD, y_NLD


def shuffled(pieces: list[Tensor], perm: Tensor) -> Tensor:
    """The pieces' rows, concatenated, in `perm` order. The pieces are released before the permuted
    copy is made: a refill holds two copies of the buffer's rows at once, not three."""
    rows = torch.cat(pieces)
    pieces.clear()
    return rows[perm]


class LMStores(NamedTuple):
    """The LM and the two activation streams `cfg` asks for: training rows, held-out rows."""

    model: HookedTransformer
    train: ActivationsStore
    eval: ActivationsStore


def lm_stores(cfg: DictConfig, model: HookedTransformer | None, device: torch.device, batch_size: int,
              info: DistInfo = SINGLE, buffer_tokens: int | None = None) -> LMStores:
    """Load the LM (unless given), check hooks and layers, split `cfg.data`'s documents into train
    and eval, and open a store on each (eval seeded with train.seed + 1). With several ranks each
    takes every world_size-th training context, starting at its rank. `buffer_tokens` replaces
    data.buffer_tokens for the training store. Nothing runs the LM yet.

    The eval store's buffer is 2 · train.batch_size, the least a store allows: its rows are read once
    (take_tokens), not mixed for SGD, so a data.buffer_tokens window would run the LM on rows nobody
    reads (32,768 for 2,048 eval tokens). Its batches do not depend on how many are taken, so every
    reader of the held-out stream (the eval set, a cache's eval rows, convert's fit rows) reads a
    prefix of the same rows."""
    n_needed = max(cfg.arch.layers) + 1
    n_layers = (model.cfg.n_layers if model is not None
                else cfg.model.first_n_layers or model_n_layers(cfg.model.name, cfg.model.cache_dir))
    require(n_needed <= n_layers, f"arch.layers={list(cfg.arch.layers)} out of range: {cfg.model.name} has "
                                  f"{n_layers} layers (0..{n_layers - 1})")
    # the text before the model: a bad corpus fails without loading weights
    texts = load_texts(cfg.data.source, cfg.data.path, cfg.data.name, cfg.data.split, cfg.data.column,
                       cfg.data.streaming)
    train_texts, eval_texts = split_documents(texts, cfg.data.eval_fraction, cfg.train.seed)
    if model is None:
        model = load_model(cfg.model.name, str(rank_device(cfg.model.device, info)), cfg.model.dtype,
                           cfg.model.first_n_layers or n_needed, cfg.model.cache_dir)
    check_hooks(model, sum(arch_hooks(cfg.arch), []))
    tok = model.tokenizer
    exclude = sorted({t for t in (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) if t is not None})

    def store(texts, seed: int, size: int, buffer: int, rank: int = 0, world_size: int = 1) -> ActivationsStore:
        contexts = token_contexts((row[cfg.data.column] for row in texts), tok, cfg.data.context_size,
                                  cfg.data.prepend_bos)
        return ActivationsStore(model, islice(contexts, rank, None, world_size), *arch_hooks(cfg.arch), size,
                                buffer, cfg.data.lm_batch_size, device, exclude_token_ids=exclude, seed=seed)

    return LMStores(model, store(train_texts, cfg.train.seed, batch_size, buffer_tokens or cfg.data.buffer_tokens,
                                 info.rank, info.world_size),
                    store(eval_texts, cfg.train.seed + 1, cfg.train.batch_size, 2 * cfg.train.batch_size))


def lm_train_store(cfg: DictConfig, batch_size: int, info: DistInfo, device: torch.device) -> ActivationsStore:
    """The training store `lm_stores` gives this rank, its LM loaded here: what a spawned background
    process (background.py) runs, as `functools.partial(lm_train_store, cfg, batch_size, info, device)`."""
    if device.type == "cuda":  # a spawned process starts on GPU 0: "cuda" must mean this rank's
        torch.cuda.set_device(device)
    return lm_stores(cfg, None, device, batch_size, info).train
