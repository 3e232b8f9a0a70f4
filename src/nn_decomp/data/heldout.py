"""Held-out text: the documents a checkpoint's run never trained on, for every analysis of a trained
dictionary (evaluate, convert, interp, the experiments, and the coming attribution / SAEBench
bridges). Held out = the `data.eval_fraction` of documents `split_documents` sets apart under the
run's `train.seed`; for a run on an activation cache, of the text that cache was built from.
"""
from __future__ import annotations

import math
from itertools import islice

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from nn_decomp.config import UsageError
from nn_decomp.data.sources import take_tokens


def excluded_token_ids(tokenizer) -> list[int]:
    """BOS, EOS and pad: the tokens the training store drops."""
    ids = (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
    return sorted({t for t in ids if t is not None})


def text_config(ckpt_cfg: DictConfig, meta: dict) -> DictConfig:
    """The checkpoint's config with `data` naming the text it was trained on: for a run on an
    activation cache (data=cache), the text that cache was built from."""
    if ckpt_cfg.data.source != "cache":
        return ckpt_cfg
    if "cache" not in meta:
        raise UsageError("the checkpoint was trained on an activation cache but its metadata.json does not say "
                         "which text the cache came from; retrain, or add metadata['cache']['text_source']")
    cfg = ckpt_cfg.copy()
    cfg.data = OmegaConf.create(meta["cache"]["text_source"])
    return cfg


def heldout_contexts(ckpt_cfg: DictConfig, tokenizer, n_tokens: int, context_size: int | None = None) -> Tensor:
    """[C, T] token ids from the documents the checkpoint's run held out (data.eval_fraction,
    train.seed), packed as in training (T = context_size or data.context_size); as many contexts as
    n_tokens needs, in document order."""
    from nn_decomp.data.text import load_texts, split_documents, token_contexts  # datasets: seconds, after the checks

    data = ckpt_cfg.data
    context_size = context_size or data.context_size
    texts = load_texts(data.source, data.path, data.name, data.split, data.column, data.streaming)
    eval_texts = split_documents(texts, data.eval_fraction, ckpt_cfg.train.seed)[1]
    n_contexts = math.ceil(n_tokens / context_size)
    contexts = list(islice(token_contexts((row[data.column] for row in eval_texts), tokenizer,
                                          context_size, data.prepend_bos), n_contexts))
    if not contexts:
        raise UsageError("the held-out split has no full context: lower data.context_size or raise data.eval_fraction")
    return torch.stack(contexts)


def heldout_activations(ckpt_cfg: DictConfig, model, device, n_fit: int, n_eval: int):
    """((x, y) fitting rows, (x, y) report rows): disjoint batches of the held-out activation stream
    (the training run's eval store: held-out documents, seeded with train.seed + 1)."""
    from nn_decomp.data.store import lm_stores  # transformer_lens: seconds, after the checks

    store = lm_stores(ckpt_cfg, model, device, ckpt_cfg.train.batch_size).eval
    try:
        return take_tokens(store, n_fit), take_tokens(store, n_eval)
    except StopIteration:
        raise UsageError(f"the held-out split has fewer than n_tokens + n_eval_tokens = {n_fit + n_eval} "
                         "tokens: lower n_tokens / n_eval_tokens") from None
