"""Exact values of the objective's terms on tiny hand-made tensors; every expected number is worked
out by hand in the comments, not by calling the code under test."""
import copy
import math

import pytest
import torch

from helpers import arch_act_cfg
from nn_decomp.core.activations import JumpReLU, Latents, ReLU, TopK
from nn_decomp.runtime.checkpoint import build_coder
from nn_decomp.core.coder import SparseCoder
from nn_decomp.core.losses import aux_k_loss, coder_loss, explained_variance, fvu, squared_error

S2 = math.sqrt(2)


def set_weights(coder: SparseCoder, W_enc=None, b_enc=None, W_dec=None, b_dec=None) -> SparseCoder:
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("b_dec", b_dec)):
            if value is not None:
                getattr(coder, name).copy_(torch.tensor(value))
        for i, w in enumerate(W_dec or []):
            coder.W_dec[i].copy_(torch.tensor(w))
    return coder


# y and ŷ for two tokens, one layer, two dims.
Y = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])
Y_HAT = torch.tensor([[[0.0, 0.0]], [[3.0, 2.0]]])


def test_squared_error_sums_dims_and_averages_tokens_and_layers():
    # token 0: 1² + 2² = 5; token 1: 0² + 2² = 4 → mean 4.5
    assert squared_error(Y_HAT, Y).item() == pytest.approx(4.5)
    # a second layer with errors 1 and 3 (squared: 1, 9): mean over 4 (token, layer) pairs
    y = torch.cat([Y, torch.tensor([[[1.0, 0.0]], [[0.0, 3.0]]])], 1)
    y_hat = torch.cat([Y_HAT, torch.zeros(2, 1, 2)], 1)
    assert squared_error(y_hat, y).item() == pytest.approx((5 + 4 + 1 + 9) / 4)


def test_fvu_is_centred_and_per_layer():
    # residual Σ(y−ŷ)² = 5 + 4 = 9; ȳ = (2, 3), Σ(y−ȳ)² = 1+1+1+1 = 4 → 9/4
    # layer 1: y = (2,0), (4,0), ŷ = (2,0), (2,0) → residual 4; ȳ = (3,0), total 2 → 2
    y = torch.cat([Y, torch.tensor([[[2.0, 0.0]], [[4.0, 0.0]]])], 1)
    y_hat = torch.cat([Y_HAT, torch.tensor([[[2.0, 0.0]], [[2.0, 0.0]]])], 1)
    torch.testing.assert_close(fvu(y_hat, y), torch.tensor([2.25, 2.0]))
    # predicting the mean explains nothing, predicting y explains everything
    torch.testing.assert_close(fvu(Y.mean(0, keepdim=True).expand_as(Y), Y), torch.tensor([1.0]))
    torch.testing.assert_close(fvu(Y, Y), torch.tensor([0.0]))


def test_explained_variance_ignores_a_constant_offset():
    # y−ŷ = (1,2), (0,2): unbiased variances over tokens 0.5 and 0; Var y = 2 + 2 → 1 − 0.5/4
    torch.testing.assert_close(explained_variance(Y_HAT, Y), torch.tensor([0.875]))
    # ŷ = y + c: the error is constant, so EV = 1, while FVU counts the offset
    offset = Y + torch.tensor([1.0, -1.0])
    torch.testing.assert_close(explained_variance(offset, Y), torch.tensor([1.0]))
    # FVU: Σ(y−ŷ)² = 2·(1+1) = 4 over total 4
    torch.testing.assert_close(fvu(offset, Y), torch.tensor([1.0]))


def test_relu_l1_penalty_is_weighted_by_decoder_norm():
    coder = SparseCoder(2, 2, 3, 1, ReLU(l1_coef=0.5))
    # decoder norms 5, 1, 2
    set_weights(coder, W_enc=[[[1.0, 0.0], [-1.0, 1.0], [2.0, 1.0]]], b_enc=[[0.0, 0.0, 0.0]],
                W_dec=[[[[3.0, 4.0]], [[1.0, 0.0]], [[0.0, 2.0]]]])
    torch.testing.assert_close(coder.decoder_norm(), torch.tensor([[5.0, 1.0, 2.0]]))
    x = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    out = coder(x)
    # token 0: pre (1, −1, 2) → f (1, 0, 2) → 1·5 + 2·2 = 9; token 1: (0, 1, 1) → 1·1 + 1·2 = 3
    # mean 6, times l1_coef 0.5
    losses = coder_loss(coder, out, x, None)
    assert losses.sparsity.item() == pytest.approx(3.0)
    assert losses.loss.item() == pytest.approx(losses.recon.item() + 3.0)
    assert losses.aux.item() == 0


def test_relu_p_annealing_schedule_and_penalty():
    act = ReLU(l1_coef=0.5, p_end=0.25, anneal_start=0.5)
    # p = 1 up to half of training, then linear to 0.25 at the end: 1 − 0.75·(0.75 − 0.5)/0.5 = 0.625
    assert [act.exponent(t) for t in (0.0, 0.5, 0.75, 1.0)] == pytest.approx([1.0, 1.0, 0.625, 0.25])
    coder = SparseCoder(2, 2, 3, 1, act)
    # the L1 test's weights: weighted activations f·‖W_dec‖ are (5, 0, 4) and (0, 1, 2)
    set_weights(coder, W_enc=[[[1.0, 0.0], [-1.0, 1.0], [2.0, 1.0]]], b_enc=[[0.0, 0.0, 0.0]],
                W_dec=[[[[3.0, 4.0]], [[1.0, 0.0]], [[0.0, 2.0]]]])
    x = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    out = coder(x)
    assert coder_loss(coder, out, x, None, progress=0.25).sparsity.item() == pytest.approx(3.0)  # plain L1
    # p = 0.25: token 0: 5^¼ + 4^¼, token 1: 1 + 2^¼; mean, times 0.5; the zero entries add nothing
    expected = 0.5 * (5 ** 0.25 + 4 ** 0.25 + 1 + 2 ** 0.25) / 2
    losses = coder_loss(coder, out, x, None, progress=1.0)
    assert losses.sparsity.item() == pytest.approx(expected)
    losses.loss.backward()  # a zero activation's (infinite) slope must not reach the weights as nan
    assert all(torch.isfinite(p.grad).all() for p in coder.parameters() if p.grad is not None)
    # d/db of 0.5·(f·‖W_dec‖)^¼ / 2 tokens for latent 2 (f = 2 then 1, ‖W_dec‖ = 2): the penalty's part
    # of b_enc's gradient, 0.25·0.25·(4^−¾·2 + 2^−¾·2), with the reconstruction's part removed
    coder.zero_grad()
    coder_loss(coder, coder(x), x, None, progress=1.0).sparsity.backward()
    assert coder.b_enc.grad[0, 2].item() == pytest.approx(0.0625 * 2 * (4 ** -0.75 + 2 ** -0.75))


def test_relu_l1_penalty_uses_the_concatenated_clt_decoder_norm():
    coder = SparseCoder(2, 2, 1, 2, ReLU(l1_coef=0.25), cross_layer=True)
    # source 0 writes (3,0) to layer 0 and (0,4) to layer 1: concatenated norm 5 (not 3 + 4);
    # source 1 writes (0,2) to layer 1: norm 2
    set_weights(coder, W_enc=torch.zeros(2, 1, 2).tolist(), b_enc=[[1.0], [2.0]],
                W_dec=[[[[3.0, 0.0], [0.0, 4.0]]], [[[0.0, 2.0]]]])
    torch.testing.assert_close(coder.decoder_norm(), torch.tensor([[5.0], [2.0]]))
    x = torch.randn(3, 2, 2)
    out = coder(x)
    # f = 1 at layer 0, 2 at layer 1 for every token: 0.25·(1·5 + 2·2)
    assert coder_loss(coder, out, x, None).sparsity.item() == pytest.approx(2.25)


PRE = torch.tensor([[[0.2, 0.7, 1.5]], [[0.6, 0.4, -1.0]]])  # [B=2, L=1, F=3]
DEC_NORM = torch.tensor([[1.0, 2.0, 0.5]])


def jumprelu(**kwargs) -> JumpReLU:
    args = dict(sparsity_coef=0.1, penalty="l0", bandwidth=0.1, init_threshold=0.5, tanh_scale=4.0,
                pre_act_coef=0.0)
    act = JumpReLU(**(args | kwargs))
    act.init_threshold(1, 3)
    return act


def test_jumprelu_l0_penalty_counts_latents_above_threshold():
    act = jumprelu(sparsity_coef=0.3)
    latents = act(PRE)
    # θ = 0.5: token 0 keeps 0.7 and 1.5, token 1 keeps 0.6
    torch.testing.assert_close(latents.values, torch.tensor([[[0.0, 0.7, 1.5]], [[0.6, 0.0, 0.0]]]))
    # (2 + 1) / 2 tokens · 0.3; the decoder norm does not enter the l0 penalty
    assert act.penalty(PRE, latents, DEC_NORM).item() == pytest.approx(0.45)
    assert act.penalty(PRE, latents, 7 * DEC_NORM).item() == pytest.approx(0.45)
    assert act.unit_norm_decoder


def test_jumprelu_target_penalty_and_its_gradient_reach_only_theta():
    act = jumprelu(sparsity_coef=3.0, penalty="target", target_l0=1.0, bandwidth=0.4)
    pre = PRE.clone().requires_grad_()
    latents = act(pre)
    # L0 = (2 + 1) / 2 = 1.5 tokens' mean; 3·(1.5/1 − 1)² = 0.75, whatever the decoder norm
    loss = act.penalty(pre, latents, 7 * DEC_NORM)
    assert loss.item() == pytest.approx(0.75)
    loss.backward()
    assert pre.grad is None  # the step function passes nothing to the pre-activations
    # dloss/dθ_f = 3·2·(0.5)·(1/2 tokens)·Σ_b −(1/ε)·K((z−θ)/ε), the band |z − θ| < ε/2 = 0.2:
    # latent 0 holds z = 0.6 (token 1), latent 1 holds z = 0.7 and 0.4, latent 2 none
    per_entry = 3 * 2 * 0.5 * 0.5 * -(1 / 0.4)
    expected = torch.tensor([[per_entry * 1, per_entry * 2, 0.0]]) * act.threshold  # through log θ
    torch.testing.assert_close(act.log_threshold.grad, expected)
    assert act.unit_norm_decoder


def test_jumprelu_tanh_penalty():
    act = jumprelu(sparsity_coef=0.3, penalty="tanh", tanh_scale=4.0)
    latents = act(PRE)
    # tanh(4·|f|·‖W_dec‖) for f = 0.7 (norm 2), 1.5 (norm 0.5), 0.6 (norm 1); mean over 2 tokens
    expected = 0.3 * (math.tanh(4 * 0.7 * 2) + math.tanh(4 * 1.5 * 0.5) + math.tanh(4 * 0.6 * 1)) / 2
    assert act.penalty(PRE, latents, DEC_NORM).item() == pytest.approx(expected)
    assert not act.unit_norm_decoder


def test_jumprelu_pre_activation_loss():
    act = jumprelu(sparsity_coef=0.0, pre_act_coef=2.0)
    # Σ ReLU(θ − z)·‖W_dec‖ with θ = 0.5:
    # token 0: 0.3·1 + 0 + 0 = 0.3; token 1: 0 + 0.1·2 + 1.5·0.5 = 0.95 → mean 0.625, times 2
    assert act.penalty(PRE, act(PRE), DEC_NORM).item() == pytest.approx(1.25)
    # added to the sparsity term: l0 penalty 0.1·1.5 = 0.15
    act = jumprelu(sparsity_coef=0.1, pre_act_coef=2.0)
    assert act.penalty(PRE, act(PRE), DEC_NORM).item() == pytest.approx(1.4)


def aux_coder(n_layers: int = 1, k_aux: int | None = 2) -> SparseCoder:
    """d = 2, four latents writing e0, e1, (e0+e1)/√2, (e0−e1)/√2, non-zero b_dec (must not enter)."""
    coder = SparseCoder(2, 2, 4, n_layers, TopK(k=1, k_aux=k_aux, aux_coef=0.5), cross_layer=n_layers > 1)
    rows = [[1.0, 0.0], [0.0, 1.0], [1 / S2, 1 / S2], [1 / S2, -1 / S2]]
    w_dec = [[[r] * (n_layers - i) for r in rows] for i in range(n_layers)]
    return set_weights(coder, W_dec=w_dec, b_dec=[[7.0, 7.0]] * n_layers)


def test_aux_k_uses_only_the_top_k_aux_dead_latents():
    coder = aux_coder()
    pre = torch.tensor([[[5.0, 5.0, 2.0, 3.0]]])
    residual = torch.tensor([[[1.0, 2.0]]])
    dead = torch.tensor([[False, False, True, True]])
    # k_aux = 1: latent 3 (pre 3) beats latent 2; the live latents 0, 1 (pre 5) are ignored.
    # r̂ = 3·(1, −1)/√2; 2 dead ≥ k_aux, so scale 1
    expected = (1 - 3 / S2) ** 2 + (2 + 3 / S2) ** 2
    assert aux_k_loss(coder, pre, residual, dead, k_aux=1).item() == pytest.approx(expected)
    # k_aux = 2: both dead latents, r̂ = 2·(1,1)/√2 + 3·(1,−1)/√2 = (5/√2, −1/√2)
    expected = (1 - 5 / S2) ** 2 + (2 + 1 / S2) ** 2
    assert aux_k_loss(coder, pre, residual, dead, k_aux=2).item() == pytest.approx(expected)


def test_aux_k_is_scaled_down_when_fewer_latents_are_dead_than_k_aux():
    coder = aux_coder()
    pre = torch.tensor([[[5.0, 5.0, 2.0, -1.0]]])
    residual = torch.tensor([[[1.0, 2.0]]])
    dead = torch.tensor([[False, False, True, True]])
    # latent 3 is dead but negative: ReLU → 0. r̂ = 2·(1,1)/√2 = (√2, √2)
    err = (1 - S2) ** 2 + (2 - S2) ** 2
    assert aux_k_loss(coder, pre, residual, dead, k_aux=2).item() == pytest.approx(err)
    # k_aux = 8 with 2 dead: same latents, scaled by 2/8
    assert aux_k_loss(coder, pre, residual, dead, k_aux=8).item() == pytest.approx(err / 4)
    assert aux_k_loss(coder, pre, residual, torch.zeros(1, 4, dtype=torch.bool), k_aux=2).item() == 0


def test_aux_k_gives_gradient_only_to_dead_latents():
    coder = aux_coder()
    pre = torch.tensor([[[5.0, 5.0, 2.0, 3.0]]], requires_grad=True)
    dead = torch.tensor([[False, False, True, True]])
    aux_k_loss(coder, pre, torch.tensor([[[1.0, 2.0]]]), dead, k_aux=2).backward()
    assert (pre.grad[0, 0, :2] == 0).all() and (pre.grad[0, 0, 2:] != 0).all()
    assert (coder.W_dec[0].grad[:2] == 0).all() and (coder.W_dec[0].grad[2:] != 0).any()


def test_aux_k_scale_counts_dead_latents_over_all_clt_layers():
    coder = aux_coder(n_layers=2)
    pre = torch.tensor([[[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    residual = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    dead = torch.tensor([[False, False, True, False], [False, False, False, True]])
    # source 0: latent 2 at 2 writes (√2, √2) to layers 0 and 1; source 1: latent 3 at 0.
    # errors: layer 0 (1−√2)² + (2−√2)², layer 1 2·2 = 4 → mean over layers.
    # 2 dead < k_aux·L = 2·2 → scale 1/2
    err = ((1 - S2) ** 2 + (2 - S2) ** 2 + 4) / 2
    assert aux_k_loss(coder, pre, residual, dead, k_aux=2).item() == pytest.approx(err / 2)


def test_coder_loss_adds_weighted_aux_with_default_k_aux():
    coder = aux_coder(k_aux=None)  # k_aux = d_out // 2 = 1
    set_weights(coder, W_enc=[[[0.0] * 2] * 4], b_enc=[[5.0, 0.0, 2.0, 3.0]], b_dec=[[0.0, 0.0]])
    y = torch.tensor([[[6.0, 2.0]]])
    out = coder(torch.zeros(1, 1, 2))
    # TopK(1) keeps latent 0 at 5: ŷ = (5, 0), residual (1, 2), recon = 1 + 4 = 5
    dead = torch.tensor([[False, False, True, True]])
    losses = coder_loss(coder, out, y, dead)
    assert losses.recon.item() == pytest.approx(5.0)
    # k_aux = 1: latent 3 (pre 3) → r̂ = 3·(1, −1)/√2
    aux = (1 - 3 / S2) ** 2 + (2 + 3 / S2) ** 2
    assert losses.aux.item() == pytest.approx(aux)
    assert losses.loss.item() == pytest.approx(5.0 + 0.5 * aux)
    torch.testing.assert_close(losses.l0_L, torch.tensor([1.0]))
    # no dead mask: no aux term
    assert coder_loss(coder, out, y, None).loss.item() == pytest.approx(5.0)


def test_latents_l0_and_fired_ignore_padding():
    latents = Latents(torch.tensor([[[2.0, 0.0]], [[1.0, 3.0]]]), torch.tensor([[[1, 0]], [[0, 3]]]), 4)
    torch.testing.assert_close(latents.l0(), torch.tensor([1.5]))
    assert latents.fired().tolist() == [[True, True, False, True]]


@pytest.mark.parametrize("arch", ["sae", "clt"])
def test_matryoshka_loss_averages_the_error_of_each_prefix_of_one_selection(arch):
    """recon = mean over m ∈ {4, 16, F} of ‖y − ŷ_m‖², ŷ_m decoded by the first m latents of the same
    selection: here, the coder with every decoder row ≥ m zeroed (selection reads the encoder only)."""
    cfg = arch_act_cfg(arch, "topk", "arch.matryoshka=[4,16]", n_latents=64, k=8)
    torch.manual_seed(0)
    coder = build_coder(cfg, 12, 12)
    x, y = torch.randn(32, coder.n_layers, 12), torch.randn(32, coder.n_layers, 12)
    loss = coder_loss(coder, coder(x), y, None)
    errors = []
    for m in (4, 16, 64):
        truncated = copy.deepcopy(coder)
        with torch.no_grad():
            for w in truncated.W_dec:
                w[m:] = 0
        errors.append(squared_error(truncated.eval()(x).recon, y))
    torch.testing.assert_close(loss.recon, torch.stack(errors).mean())
    assert len({round(e.item(), 3) for e in errors}) == 3  # each prefix decodes something different
    assert coder.eval()(x).prefix_recons == ()  # evaluation decodes the whole dictionary only


def test_crosscoder_encodes_the_sum_over_layers_and_writes_every_layer():
    """One latent reading 2 layers: pre = W_enc[l=0]·x_0 + W_enc[l=1]·x_1 + b; ŷ_l = f·W_dec[:, l] + b_dec_l."""
    coder = SparseCoder(2, 2, 1, 2, ReLU(l1_coef=0.5), crosscoder=True, decoder_norm="sum")
    # encoder row over the stacked [x_0, x_1]: (1, 0 | 0, 2); decoder (3, 0) to layer 0, (0, 4) to layer 1
    set_weights(coder, W_enc=[[[1.0, 0.0, 0.0, 2.0]]], b_enc=[[-1.0]], W_dec=[[[[3.0, 0.0], [0.0, 4.0]]]],
                b_dec=[[0.0, 1.0], [1.0, 0.0]])
    x = torch.tensor([[[2.0, 7.0], [5.0, 1.0]]])  # pre = 2 + 2·1 − 1 = 3
    out = coder(x)
    assert out.latents.dense().tolist() == [[[3.0]]]
    torch.testing.assert_close(out.recon, torch.tensor([[[9.0, 1.0], [1.0, 12.0]]]))
    # decoder_norm=sum: 3 + 4 = 7 (concatenated it would be 5); penalty 0.5 · 3 · 7
    assert coder_loss(coder, out, x, None).sparsity.item() == pytest.approx(10.5)
    coder.decoder_norm_kind = "concat"
    assert coder_loss(coder, out, x, None).sparsity.item() == pytest.approx(7.5)


def test_molt_output_is_the_sum_of_the_gated_low_rank_maps():
    """ŷ = b + Σ_t g_t U_t V_tᵀ x over the active transforms; ReLU's penalty weighs g_t by ‖U_t V_tᵀ‖_F."""
    coder = SparseCoder(2, 2, 2, 1, ReLU(l1_coef=1.0), transforms=((1, 2), (1, 1)))
    with torch.no_grad():
        coder.W_enc.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
        coder.b_enc.copy_(torch.tensor([[0.0, -5.0]]))  # transform 1 stays off for x below
        # transform 0 (rank 2): V rows (1, 0), (0, 1), U rows (0, 2), (3, 0): U_0 V_0ᵀ x = (3·x_1, 2·x_0)
        # transform 1 (rank 1): V (1, 1), U (1, 1)
        coder.transforms.V.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        coder.transforms.U.copy_(torch.tensor([[0.0, 2.0], [3.0, 0.0], [1.0, 1.0]]))
        coder.b_dec.copy_(torch.tensor([[1.0, 1.0]]))
    # ‖U_0 V_0ᵀ‖_F = ‖[[0, 3], [2, 0]]‖ = √13, ‖U_1 V_1ᵀ‖_F = ‖[[1, 1], [1, 1]]‖ = 2
    torch.testing.assert_close(coder.decoder_norm(), torch.tensor([[13 ** 0.5, 2.0]]))
    x = torch.tensor([[[2.0, 1.0]]])  # gates (2, 1 − 5 → 0): ŷ = (1, 1) + 2·(3·1, 2·2) = (7, 9)
    for sparse in (True, False):
        coder.sparse_backward = sparse
        out = coder(x)
        torch.testing.assert_close(out.recon, torch.tensor([[[7.0, 9.0]]]))
        assert coder_loss(coder, out, x, None).sparsity.item() == pytest.approx(2 * 13 ** 0.5)
    assert coder.decoder_params().tolist() == [[2 * 4, 1 * 4]]  # rank·(d_in + d_out)
