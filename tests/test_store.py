import pytest
import torch

from helpers import compose_cfg
from nn_decomp.config import UsageError
from nn_decomp.data.hooks import check_hooks, hook_layer
from nn_decomp.data.sources import take_tokens
from nn_decomp.data.store import ActivationsStore, lm_stores

BOS = 0
LN2 = [f"blocks.{i}.ln2.hook_normalized" for i in range(3)]
MLP_OUT = [f"blocks.{i}.hook_mlp_out" for i in range(3)]


def make_contexts(n: int = 8, context_size: int = 16) -> torch.Tensor:
    """[n, context_size] random contexts; BOS only at position 0, so exclusion is visible."""
    tokens_NT = torch.randint(1, 100, (n, context_size), generator=torch.Generator().manual_seed(1))
    tokens_NT[:, 0] = BOS
    return tokens_NT


def make_store(model, hooks_in=LN2, hooks_out=MLP_OUT, contexts=None, **kwargs):
    contexts = make_contexts() if contexts is None else contexts
    args = dict(batch_size=10, buffer_tokens=40, lm_batch_size=3, device="cpu", exclude_token_ids=[BOS])
    return ActivationsStore(model, iter(contexts), hooks_in, hooks_out, **{**args, **kwargs})


def sort_rows(rows_NF: torch.Tensor) -> torch.Tensor:
    # Batches come shuffled: compare as sets of rows, ordered by a fixed random projection.
    key_N = rows_NF @ torch.randn(rows_NF.shape[1], generator=torch.Generator().manual_seed(0))
    return rows_NF[key_N.argsort()]


def test_hook_layer():
    assert hook_layer("blocks.7.ln2.hook_normalized") == 7
    assert hook_layer("blocks.12.hook_mlp_out") == 12
    assert hook_layer("hook_embed") == -1
    with pytest.raises(UsageError, match="not inside a block"):
        hook_layer("ln_final.hook_normalized")


def test_check_hooks_suggests_close_matches(tiny_model):
    check_hooks(tiny_model, LN2 + MLP_OUT)
    expected = r"'blocks.1.hook_mlp_outt' not in .*close matches: .*'blocks.1.hook_mlp_out'"
    with pytest.raises(UsageError, match=expected):
        check_hooks(tiny_model, ["blocks.1.hook_mlp_outt"])


def test_batch_size_must_fit_half_the_buffer(tiny_model):
    with pytest.raises(UsageError, match="data.buffer_tokens"):
        make_store(tiny_model, batch_size=30, buffer_tokens=40)


@pytest.mark.parametrize("buffer_tokens", [40, 120])  # 40: several refills; 120: one fill holds all
def test_activations_match_run_with_cache(tiny_model, buffer_tokens):
    contexts_NT = make_contexts()
    store = make_store(tiny_model, contexts=contexts_NT, buffer_tokens=buffer_tokens)
    batches = list(store)
    assert all(x.shape == (10, 3, 32) and y.shape == (10, 3, 32) for x, y in batches)

    _, cache = tiny_model.run_with_cache(contexts_NT)
    keep_NT = contexts_NT != BOS
    ref_x = torch.stack([cache[h] for h in LN2], dim=2)[keep_NT]
    ref_y = torch.stack([cache[h] for h in MLP_OUT], dim=2)[keep_NT]
    # x and y concatenated per row: also checks that shuffling kept each x with its own y.
    ref_rows = torch.cat([ref_x.flatten(1), ref_y.flatten(1)], dim=1)
    got_rows = torch.cat([torch.cat([x.flatten(1), y.flatten(1)], dim=1) for x, y in batches])
    assert store.tokens_generated == keep_NT.sum() == 8 * 15
    torch.testing.assert_close(sort_rows(got_rows), sort_rows(ref_rows), rtol=1e-5, atol=1e-5)


def test_sae_returns_one_tensor_for_x_and_y(tiny_model):
    hooks = ["blocks.1.hook_resid_post"]
    store = make_store(tiny_model, hooks_in=hooks, hooks_out=hooks)
    x, y = store.next_batch()
    assert y is x and x.shape == (10, 1, 32)


def test_same_seed_same_batches_other_seed_other_order(tiny_model):
    def first_batches(seed):
        return [x for x, _ in make_store(tiny_model, seed=seed)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_forward_stops_after_last_needed_block(tiny_model, monkeypatch):
    ran = []
    tiny_model.blocks[2].register_forward_hook(lambda *_: ran.append(2))
    calls = []
    run_with_cache = tiny_model.run_with_cache

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return run_with_cache(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "run_with_cache", spy)
    store = make_store(tiny_model, hooks_in=LN2[:1], hooks_out=MLP_OUT[1:2])
    store.next_batch()
    assert calls and all(kw["stop_at_layer"] == 2 for kw in calls)
    assert ran == []


def test_exhausted_contexts_stop_iteration(tiny_model):
    store = make_store(tiny_model, contexts=make_contexts(n=3), batch_size=20)  # 45 kept tokens
    assert len(list(store)) == 2  # the last 5 tokens cannot fill a batch
    with pytest.raises(StopIteration):
        store.next_batch()


def test_batches_in_requested_dtype(tiny_model):
    x, y = make_store(tiny_model, dtype=torch.float64).next_batch()
    assert x.dtype == y.dtype == torch.float64


def test_eval_store_runs_the_lm_on_about_what_it_serves(tiny_lm, monkeypatch):
    cfg = compose_cfg("arch=transcoder", "arch.layers=[1]", "model.device=cpu", "train.batch_size=128",
                      "train.eval_tokens=256", "data.context_size=32", "data.lm_batch_size=8",
                      "data.buffer_tokens=4096")
    lm_tokens = []
    run_with_cache = tiny_lm.run_with_cache

    def spy(tokens_BT, **kwargs):
        lm_tokens.append(tokens_BT.numel())
        return run_with_cache(tokens_BT, **kwargs)

    monkeypatch.setattr(tiny_lm, "run_with_cache", spy)
    x_NLD, _ = take_tokens(lm_stores(cfg, tiny_lm, torch.device("cpu"), 128).eval, 256)
    # a 2-batch buffer filled in forwards of lm_batch_size contexts: not the 4096 of data.buffer_tokens
    assert len(x_NLD) == 256 and sum(lm_tokens) <= 2 * 256 + 8 * 32
    # later batches never reshuffle earlier ones: fewer rows taken are a prefix of more
    fewer, _ = take_tokens(lm_stores(cfg, tiny_lm, torch.device("cpu"), 128).eval, 128)
    assert torch.equal(fewer, x_NLD[:128])
