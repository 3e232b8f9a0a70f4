"""Sparse kernels (kernels.py) against the dense reference path (coder.py + losses.py)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import ARCHS, arch_act_cfg
from nn_decomp.core.activations import BatchTopK, JumpReLU, Latents, TopK
from nn_decomp.runtime.checkpoint import build_coder
from nn_decomp.core.coder import SparseCoder
from nn_decomp.core.kernels import (attach_encoder_grad, aux_topk_latents, decode_source, encode_pre, entry_dots,
                               fused_topk_encode, latent_sums, row_sums, selected_entries, sparse_decode,
                               sparse_encode)
from nn_decomp.core.losses import aux_k_loss, coder_loss, squared_error

B, F_LAT, K, K_AUX = 48, 64, 6, 5
TOL = dict(rtol=1e-4, atol=1e-5)


def make_activation(act_name: str):
    if act_name == "jumprelu":
        return JumpReLU(sparsity_coef=1.0, penalty="target", bandwidth=0.1, init_threshold=0.5, tanh_scale=4.0,
                        pre_act_coef=0.0, target_l0=K, aux_coef=1 / 32, k_aux=K_AUX)
    if act_name == "topk":
        return TopK(K, K_AUX, aux_coef=1 / 32)
    return BatchTopK(K, K_AUX, aux_coef=1 / 32, threshold_momentum=0.9, per_layer=True, token_norm=False)


def make_coder(act_name: str, n_layers: int) -> SparseCoder:
    torch.manual_seed(0)
    act = make_activation(act_name)
    d_in, d_out = (16, 16) if n_layers == 1 else (16, 12)
    coder = SparseCoder(d_in, d_out, F_LAT, n_layers, act, cross_layer=n_layers > 1)
    with torch.no_grad():
        coder.b_enc.normal_(-1.0, 0.5)  # many negative pre-activations: ReLU'd top-k = padding
        coder.b_dec.normal_()
    return coder


def make_batch(coder: SparseCoder):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, coder.n_layers, coder.d_in, generator=gen)
    y = torch.randn(B, coder.n_layers, coder.d_out, generator=gen)
    # Layer 0 has many dead latents, the others fewer than K_AUX: AuxK pads with −inf picks.
    dead = torch.zeros(coder.n_layers, F_LAT, dtype=torch.bool)
    dead[0, ::3] = True
    dead[1:, :2] = True
    return x, y, dead


def fused_loss(coder: SparseCoder, x, y, dead):
    """The training objective through kernels.py: what SparseCoder.forward + coder_loss become."""
    act = coder.activation
    latents, pre = sparse_encode(x, coder.W_enc, coder.b_enc, act)
    recon = sparse_decode(latents, coder.W_dec, coder.d_out) + coder.b_dec
    k_aux = min(act.k_aux, int(dead.sum(-1).max()))
    aux_latents = aux_topk_latents(pre, dead, k_aux, x, coder.W_enc, coder.b_enc)
    residual_hat = sparse_decode(aux_latents, coder.W_dec, coder.d_out)
    scale = min(int(dead.sum()) / (act.k_aux * coder.n_layers), 1.0)
    aux = scale * squared_error(residual_hat, (y - recon).detach())
    return squared_error(recon, y) + act.aux_coef * aux, latents


def sorted_by_index(latents: Latents):
    indices, order = latents.indices.sort(-1)
    return latents.values.detach().gather(-1, order), indices


def grads(coder: SparseCoder, x):
    named = {"x": x.grad, "W_enc": coder.W_enc.grad, "b_enc": coder.b_enc.grad, "b_dec": coder.b_dec.grad}
    return named | {f"W_dec.{i}": w.grad for i, w in enumerate(coder.W_dec)}


@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("act_name", ["topk", "batchtopk"])
def test_fused_step_matches_dense(act_name, n_layers):
    dense = make_coder(act_name, n_layers)
    fused = copy.deepcopy(dense)
    dense.sparse_backward = False  # pins the dense reference once SparseCoder defaults to kernels.py
    x, y, dead = make_batch(dense)
    x_dense, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()

    out = dense(x_dense)
    loss_dense = coder_loss(dense, out, y, dead).loss
    loss_dense.backward()
    loss_fused, latents = fused_loss(fused, x_fused, y, dead)
    loss_fused.backward()

    assert (latents.values == 0).any(), "the test must exercise padding"
    torch.testing.assert_close(loss_fused, loss_dense, **TOL)
    for got, want in zip(sorted_by_index(latents), sorted_by_index(out.latents)):
        torch.testing.assert_close(got, want, **TOL)
    grads_dense, grads_fused = grads(dense, x_dense), grads(fused, x_fused)
    for name, want in grads_dense.items():
        torch.testing.assert_close(grads_fused[name], want, **TOL, msg=lambda m: f"grad {name}: {m}")
    if act_name == "batchtopk":
        torch.testing.assert_close(fused.activation.threshold, dense.activation.threshold)
    assert torch.equal(latents.fired(), (latents.dense() != 0).any(0))


@pytest.mark.parametrize("n_layers", [1, 3])
def test_aux_topk_matches_dense(n_layers):
    """AuxK alone (not diluted by the reconstruction loss): same loss and encoder gradients."""
    coder = make_coder("topk", n_layers)
    x, y, dead = make_batch(coder)
    pre = coder.encode_pre(x)
    residual = torch.randn(B, n_layers, coder.d_out)
    aux_k_loss(coder, pre, residual, dead, K_AUX).backward()
    want = coder.W_enc.grad.clone(), coder.b_enc.grad.clone()
    coder.zero_grad()
    with torch.no_grad():
        pre_detached = coder.encode_pre(x)
    k = min(K_AUX, int(dead.sum(-1).max()))
    latents = aux_topk_latents(pre_detached, dead, k, x, coder.W_enc, coder.b_enc)
    scale = min(int(dead.sum()) / (K_AUX * n_layers), 1.0)
    (scale * squared_error(sparse_decode(latents, coder.W_dec, coder.d_out), residual)).backward()
    torch.testing.assert_close((coder.W_enc.grad, coder.b_enc.grad), want, **TOL)


def test_fused_topk_encode_matches_module():
    coder = make_coder("topk", 3)
    x, _, _ = make_batch(coder)
    enc = fused_topk_encode(x, coder.W_enc, coder.b_enc, K)
    ref = coder.activation(coder.encode_pre(x))
    torch.testing.assert_close(enc.pre_acts, coder.encode_pre(x).detach(), **TOL)
    for got, want in zip(sorted_by_index(Latents(enc.values, enc.indices, F_LAT)), sorted_by_index(ref)):
        torch.testing.assert_close(got, want, **TOL)
    assert not enc.pre_acts.requires_grad and enc.values.requires_grad


def test_encoder_gradcheck():
    """Finite differences in float64, the selection held fixed."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        indices = encode_pre(x, W, b).topk(3, dim=-1).indices

    def encode(x, W, b):
        with torch.no_grad():
            values = encode_pre(x, W, b).gather(-1, indices).relu()
        return attach_encoder_grad(Latents(values, indices, 7), x, W, b).values

    assert torch.autograd.gradcheck(encode, (x, W, b))


def test_decoder_gradcheck_and_builtin():
    torch.manual_seed(0)
    indices = torch.randint(0, 9, (6, 3))
    values = torch.rand(6, 3, dtype=torch.float64)
    values[0, 1] = 0  # padding
    values.requires_grad_()
    W = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(decode_source, (indices, values, W))
    grad_out = torch.randn(6, 5, dtype=torch.float64)
    got = torch.autograd.grad(decode_source(indices, values, W), (values, W), grad_out)
    builtin = F.embedding_bag(indices, W, per_sample_weights=values, mode="sum")
    want_values, want_W = torch.autograd.grad(builtin, (values, W), grad_out)
    torch.testing.assert_close(got, (want_values, want_W))
    # A grad mask without the zero value: the same everywhere else, exactly 0 at the padding.
    got_values, got_W = torch.autograd.grad(decode_source(indices, values, W, values != 0), (values, W), grad_out)
    torch.testing.assert_close(got_W, want_W)
    torch.testing.assert_close(got_values, torch.where(values != 0, want_values, 0.0))
    assert want_values[0, 1] != 0 and got_values[0, 1] == 0


def test_variable_length_bags():
    """Entries kept by a mask (ragged rows, one row empty): per-row sums, per-latent sums, dots."""
    torch.manual_seed(0)
    n_latents = 11  # more latents than the selection touches: empty bags must give 0
    indices = torch.randint(0, 8, (7, 4))
    weights, rows, table = torch.randn(7, 4), torch.randn(7, 3), torch.randn(n_latents, 3)
    keep = torch.rand(7, 4) < 0.6
    keep[2] = False
    e = selected_entries(indices, weights, keep)
    kept = weights * keep
    torch.testing.assert_close(row_sums(e, table), (kept[..., None] * table[indices]).sum(1))
    want = torch.zeros(n_latents, 3).index_add_(0, indices.flatten(), (kept[..., None] * rows[:, None]).flatten(0, 1))
    torch.testing.assert_close(latent_sums(e, rows, n_latents), want)
    torch.testing.assert_close(entry_dots(e, table, rows), (table[indices] * rows[:, None]).sum(-1)[keep])


def elementwise_coders(arch: str, act: str, *overrides: str) -> tuple[SparseCoder, SparseCoder]:
    """(sparse, dense) copies of a ReLU or JumpReLU coder at a realistic sparsity (~5% fire)."""
    cfg = arch_act_cfg(arch, act, *overrides, n_latents=F_LAT, n_layers=3)
    torch.manual_seed(0)
    sparse = build_coder(cfg, 16, 16 if arch == "sae" else 12)
    with torch.no_grad():
        sparse.b_dec.normal_()
        if sparse.W_skip is not None:
            sparse.W_skip.normal_(0, 0.1)
        if act == "relu":
            sparse.b_enc.normal_(-1.7, 0.3)
        else:  # a wide band (ε = 0.5) below θ, so many selected entries are zero-valued band entries
            sparse.b_enc.normal_(0, 0.1)
            sparse.activation.log_threshold.uniform_(0.2, 0.9)  # θ in [1.2, 2.5]
    dense = copy.deepcopy(sparse)
    dense.sparse_backward = False
    assert sparse.sparse_backward
    return sparse, dense


def all_grads(coder: SparseCoder, x) -> dict:
    return {"x": x.grad} | {name: p.grad for name, p in coder.named_parameters()}


@pytest.mark.parametrize("act", ["relu", "jumprelu-l0", "jumprelu-tanh"])
@pytest.mark.parametrize("arch", ARCHS)
def test_elementwise_sparse_step_matches_dense(arch, act):
    act, _, penalty = act.partition("-")
    overrides = [f"act.penalty={penalty}", "act.bandwidth=0.5"] if penalty else []
    sparse, dense = elementwise_coders(arch, act, *overrides)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, sparse.n_layers, sparse.d_in, generator=gen)
    x[:4] = 0  # pre = b_enc, below the support: rows with no selected latent, all padding
    y = torch.randn(B, sparse.n_layers, sparse.d_out, generator=gen)
    x_sparse, x_dense = x.clone().requires_grad_(), x.clone().requires_grad_()

    out_sparse, out_dense = sparse(x_sparse), dense(x_dense)
    loss_sparse, loss_dense = coder_loss(sparse, out_sparse, y, None), coder_loss(dense, out_dense, y, None)
    loss_sparse.loss.backward()
    loss_dense.loss.backward()

    latents = out_sparse.latents
    assert latents.indices is not None and out_dense.latents.indices is None
    fire_rate = (latents.values != 0).float().mean().item() * latents.values.shape[-1] / F_LAT
    assert 0.01 < fire_rate < 0.1
    assert not latents.values[:4].any(), "the test must exercise rows of padding only"
    torch.testing.assert_close(latents.dense(), out_dense.latents.values, **TOL)
    torch.testing.assert_close(loss_sparse.sparsity, loss_dense.sparsity, **TOL)
    torch.testing.assert_close(loss_sparse.loss, loss_dense.loss, **TOL)
    assert torch.equal(latents.fired(), out_dense.latents.fired())
    torch.testing.assert_close(latents.l0(), out_dense.latents.l0())
    grads_sparse, grads_dense = all_grads(sparse, x_sparse), all_grads(dense, x_dense)
    for name, want in grads_dense.items():
        assert want is not None and want.abs().sum() > 0, name
        torch.testing.assert_close(grads_sparse[name], want, **TOL, msg=lambda m: f"grad {name}: {m}")


def test_jumprelu_pre_activation_loss_keeps_the_dense_path():
    cfg = arch_act_cfg("sae", "jumprelu", "act.pre_act_coef=0.1", n_latents=F_LAT)
    assert not build_coder(cfg, 16, 16).sparse_backward


@pytest.mark.parametrize("act_name,token_norm",
                         [("topk", False), ("batchtopk", False), ("batchtopk", True), ("jumprelu", False)])
def test_aux_k_gradient_reaches_dead_encoder_rows_in_production(act_name, token_norm):
    """SparseCoder.forward + coder_loss, as Trainer.train_step calls them: a latent that is dead and
    never selected (JumpReLU: its pre-activation ≈ 0.2, below θ − ε/2 = 0.45, so outside the kernel
    band too) gets an encoder gradient only from AuxK, the same on the sparse and dense paths, and
    none without AuxK."""
    sparse = make_coder(act_name, 1)
    sparse.activation.token_norm = token_norm
    x, y, dead = make_batch(sparse)
    if token_norm:  # Trainer.train_step's inputs: tokens (and targets) scaled to norm √d_in
        s = sparse.token_scale(x)
        x, y = x * s, y * s
    with torch.no_grad():  # live latents ≈ 10 fill every selection; dead ones (0, 3, 6, ...) sit ≈ 1
        sparse.b_enc[0] = torch.where(dead[0], 0.2 if act_name == "jumprelu" else 1.0, 10.0)
        sparse.W_enc[0, dead[0]] *= 0.01
    dense = copy.deepcopy(sparse)
    dense.sparse_backward = False
    for coder in (sparse, dense):
        loss = coder_loss(coder, coder(x), y, dead)
        assert loss.aux > 0
        loss.loss.backward()
        assert (coder(x).latents.dense()[..., dead[0]] == 0).all(), "dead latents must not be selected"
        grad_dead = coder.W_enc.grad[0, dead[0]].norm(dim=-1)
        assert (grad_dead > 0).any(), f"{act_name}: AuxK's gradient does not reach W_enc"
    torch.testing.assert_close(sparse.W_enc.grad, dense.W_enc.grad, **TOL)
    torch.testing.assert_close(sparse.b_enc.grad, dense.b_enc.grad, **TOL)
    sparse.zero_grad()
    sparse.activation.aux_coef = 0.0
    coder_loss(sparse, sparse(x), y, dead).loss.backward()
    assert (sparse.W_enc.grad[0, dead[0]] == 0).all()


@pytest.mark.parametrize("act", ["topk", "batchtopk", "relu", "jumprelu"])
@pytest.mark.parametrize("arch", ARCHS)
def test_matryoshka_sparse_step_matches_dense(arch, act):
    """Matryoshka prefixes on the production path (SparseCoder.forward + coder_loss): the sparse
    step gives the dense reference's loss and every gradient."""
    overrides = ["arch.matryoshka=[8,24]"] + (["act.token_norm=false"] if act == "batchtopk" else [])
    if act in ("relu", "jumprelu"):
        sparse, dense = elementwise_coders(arch, act, *overrides)
    else:
        sparse = make_coder_from_cfg(arch_act_cfg(arch, act, *overrides, n_latents=F_LAT, k=K))
        dense = copy.deepcopy(sparse)
        dense.sparse_backward = False
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, sparse.n_layers, sparse.d_in, generator=gen)
    y = torch.randn(B, sparse.n_layers, sparse.d_out, generator=gen)
    x_sparse, x_dense = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_sparse, out_dense = sparse(x_sparse), dense(x_dense)
    assert len(out_sparse.prefix_recons) == len(out_dense.prefix_recons) == 2
    loss_sparse, loss_dense = coder_loss(sparse, out_sparse, y, None), coder_loss(dense, out_dense, y, None)
    loss_sparse.loss.backward()
    loss_dense.loss.backward()
    torch.testing.assert_close(loss_sparse.loss, loss_dense.loss, **TOL)
    grads_sparse, grads_dense = all_grads(sparse, x_sparse), all_grads(dense, x_dense)
    for name, want in grads_dense.items():
        if want is None:  # BatchTopK's running threshold is a buffer-like parameter without a gradient
            assert grads_sparse[name] is None, name
            continue
        torch.testing.assert_close(grads_sparse[name], want, **TOL, msg=lambda m: f"grad {name}: {m}")


def make_coder_from_cfg(cfg) -> SparseCoder:
    torch.manual_seed(0)
    coder = build_coder(cfg, 16, 16 if cfg.arch.name == "sae" else 12)
    with torch.no_grad():
        coder.b_dec.normal_()
        if coder.W_skip is not None:
            coder.W_skip.normal_(0, 0.1)
    return coder


@pytest.mark.parametrize("act", ["topk", "relu"])
@pytest.mark.parametrize("variant", [["arch.decoder_tying=per_source", "arch.per_target_scale=true"],
                                     ["arch.decoder_tying=per_target"],
                                     ["arch.feature_offset=true", "arch.feature_scale=true", "arch.skip=true"]])
def test_clt_variant_sparse_step_matches_dense(variant, act):
    """Tied decoders, feature offset / scale and a CLT skip on the production path: the sparse step
    gives the dense reference's loss and every gradient (scales and offsets included)."""
    if act == "relu":
        sparse, dense = elementwise_coders("clt", act, *variant)
    else:
        sparse = make_coder_from_cfg(arch_act_cfg("clt", act, *variant, n_latents=F_LAT, k=K))
        dense = copy.deepcopy(sparse)
        dense.sparse_backward = False
    with torch.no_grad():
        for coder in (sparse, dense):
            for p in (coder.W_dec_scale, coder.feature_offset, coder.feature_scale):
                if p is not None:
                    p.copy_(torch.linspace(0.5, 1.5, p.numel()).view_as(p))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, sparse.n_layers, sparse.d_in, generator=gen)
    y = torch.randn(B, sparse.n_layers, sparse.d_out, generator=gen)
    x_sparse, x_dense = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss_sparse = coder_loss(sparse, sparse(x_sparse), y, None).loss
    loss_dense = coder_loss(dense, dense(x_dense), y, None).loss
    loss_sparse.backward()
    loss_dense.backward()
    torch.testing.assert_close(loss_sparse, loss_dense, **TOL)
    grads_sparse, grads_dense = all_grads(sparse, x_sparse), all_grads(dense, x_dense)
    for name, want in grads_dense.items():
        assert want is not None and want.abs().sum() > 0, name
        torch.testing.assert_close(grads_sparse[name], want, **TOL, msg=lambda m: f"grad {name}: {m}")
