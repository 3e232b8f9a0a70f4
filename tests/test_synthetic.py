"""data=synthetic: the planted model's statistics, identical streams, and the recovery metrics."""
import pytest
import torch

from helpers import compose_cfg
from nn_decomp.data.synthetic import SyntheticData, absorption, plant, recovery, unit


def data_cfg(*overrides: str):
    return compose_cfg("data=synthetic", *overrides).data


def test_planted_statistics():
    cfg = data_cfg("data.n_features=512", "data.d_in=64", "data.n_parents=16", "data.mean_l0=6")
    data = SyntheticData(cfg, "sae", 1, 256, seed=0, device="cpu")
    x, y, draw = data.rows(16384, torch.Generator().manual_seed(3))
    acts = draw.dense()[:, 0]
    assert torch.equal(x, y)
    assert (acts > 0).sum(-1).float().mean().item() == pytest.approx(6, rel=0.05)
    assert x.pow(2).sum(-1).mean().item() == pytest.approx(64, rel=0.05)
    parent = data.truth.parent_N
    children = (parent >= 0).nonzero()[:, 0]
    assert len(children) == 16 * 4
    on = acts > 0
    assert not (on[:, children] & ~on[:, parent[children]]).any(), "a child fired without its parent"
    given_parent = on[:, children][on[:, parent[children]]].float().mean().item()
    assert given_parent == pytest.approx(0.3, abs=0.02)
    # Zipf: the most frequent free feature fires far more often than the rarest
    free = (parent < 0).nonzero()[:, 0]
    rate = on[:, free].float().mean(0)
    assert rate.max() > 20 * rate.min()
    # parents come from the frequent half; p_N is what every feature fires at, children included
    p = data.truth.p_N
    parents = parent[children].unique()
    more_frequent = (p[parent < 0][None] > p[parents][:, None]).sum(-1)  # rank among the non-children
    assert (more_frequent < len(p) // 2).all()
    torch.testing.assert_close(on.float().mean(0), p, atol=0.006, rtol=0.1)


def test_streams_are_identical_for_a_seed_and_apart_from_eval_and_init():
    cfg = compose_cfg("data=synthetic", "arch=transcoder", "train.batch_size=64")
    a, b = (SyntheticData.for_run(cfg, "cpu") for _ in range(2))
    for _ in range(3):
        torch.testing.assert_close(a.next_batch(), b.next_batch(), rtol=0, atol=0)
    # data-parallel ranks' slices, side by side, are the one-process batches
    one, shards = SyntheticData.for_run(cfg, "cpu"), [SyntheticData.for_run(cfg, "cpu", rank, 2) for rank in range(2)]
    for _ in range(2):
        whole, parts = one.next_batch(), [s.next_batch() for s in shards]
        for t, (p0, p1) in zip(whole, zip(*parts)):
            torch.testing.assert_close(torch.cat([p0, p1]), t, rtol=0, atol=0)
    x_eval = a.eval_rows(64)[0]
    assert not torch.equal(x_eval, SyntheticData.for_run(cfg, "cpu").next_batch()[0])
    # the planted directions are not what torch.manual_seed(train.seed) draws for the coder's init
    torch.manual_seed(cfg.train.seed)
    init = torch.randn(cfg.data.n_features, 1, cfg.data.d_in)[:, 0]
    assert (unit(init) @ unit(a.truth.enc_LND[0]).T).abs().max() < 0.6


def test_transcoder_and_clt_targets_are_the_planted_writes():
    cfg = data_cfg("data.n_features=32", "data.d_in=8", "data.d_out=6", "data.n_parents=2", "data.mean_l0=2",
                   "data.noise=0", "data.cross_layer_scale=0.5")
    data = SyntheticData(cfg, "clt", 3, 16, seed=0, device="cpu")
    x, y, draw = data.rows(16, torch.Generator().manual_seed(0))
    acts = draw.dense()
    dec = data.truth.dec_LNX.view(3, 32, 3, 6)
    assert torch.equal(dec[1, :, 0], torch.zeros(32, 6)), "no write to an earlier layer"
    assert dec[0, :, 0].norm(dim=-1).allclose(torch.ones(32)) and dec[0, :, 2].norm(dim=-1).allclose(torch.full((32,), 0.5))
    want = torch.einsum("bln,lnje->bje", acts, dec) * data.scale_y_L1
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(x, torch.einsum("bln,lnd->bld", acts, data.truth.enc_LND) * data.scale_x_L1)


def test_recovery_scores_the_truth_and_a_random_dictionary():
    cfg = data_cfg("data.n_features=64", "data.d_in=32", "data.n_parents=4")
    truth = plant(cfg, "sae", 1)
    acts = torch.zeros(10, 1, 64)
    exact = recovery([torch.cat([truth.dec_LNX[0], torch.randn(16, 32)])], truth, acts, acts)
    assert exact["mean_max_cos"] == pytest.approx(1.0) and exact["frac_above_0.9"] == 1.0
    rand = recovery([torch.randn(64, 32)], truth, acts, acts)
    assert rand["mean_max_cos"] < 0.6 and rand["frac_above_0.9"] == 0.0


def test_absorption():
    """Parent 0 with child 1. The parent's latent 5 fires on every parent token: no absorption; it
    fires only when the child is off: absorption 1 (the child's latent took the parent's direction)."""
    parent_N = torch.tensor([-1, 0, -1])
    acts = torch.zeros(40, 1, 3)
    acts[:, 0, 0] = 1
    acts[:20, 0, 1] = 1  # child on in the first half
    match = torch.tensor([[5, 6, 7]])
    latents = torch.zeros(40, 1, 8)
    latents[:, 0, 5] = 1
    assert absorption(latents, acts, match, parent_N) == 0
    latents[:20, 0, 5] = 0
    assert absorption(latents, acts, match, parent_N) == 1
