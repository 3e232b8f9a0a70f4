"""Activations: exact straight-through gradients (hand-computed), selection counts of TopK and
BatchTopK, BatchTopK's batch-independent inference threshold, and the sparse/dense round trip."""
import math

import pytest
import torch

from nn_decomp.core.activations import (BatchTopK, JumpReLU, JumpReLUFunction, Latents, StepFunction, TopK,
                                   dense_to_sparse)

# z [B=3, L=1, F=2], θ [L=1, F=2], upstream gradient g, bandwidth ε = 0.2 (window |z−θ| < 0.1)
Z = torch.tensor([[[0.45, 1.2]], [[0.58, 0.95]], [[0.3, 1.05]]])
THETA = torch.tensor([[0.5, 1.0]])
G = torch.tensor([[[1.0, 2.0]], [[3.0, -1.0]], [[0.5, 4.0]]])
EPS = 0.2


def test_jumprelu_function_forward_and_straight_through_gradients():
    z, theta = Z.clone().requires_grad_(), THETA.clone().requires_grad_()
    out = JumpReLUFunction.apply(z, theta, EPS)
    # z·H(z−θ): latent 0 passes only 0.58 > 0.5, latent 1 passes 1.2 and 1.05 > 1.0
    torch.testing.assert_close(out, torch.tensor([[[0.0, 1.2]], [[0.58, 0.0]], [[0.0, 1.05]]]))
    out.backward(G)
    # ∂/∂z = H(z−θ)·g
    torch.testing.assert_close(z.grad, torch.tensor([[[0.0, 2.0]], [[3.0, 0.0]], [[0.0, 4.0]]]))
    # ∂/∂θ = Σ_b −(θ/ε)·K((z−θ)/ε)·g. In the window: latent 0 tokens 0, 1 (z−θ = −0.05, 0.08);
    # latent 1 tokens 1, 2 (−0.05, 0.05). θ0: −(0.5/0.2)·(1 + 3) = −10; θ1: −(1/0.2)·(−1 + 4) = −15
    torch.testing.assert_close(theta.grad, torch.tensor([[-10.0, -15.0]]))


def test_step_function_forward_and_gradients():
    z, theta = Z.clone().requires_grad_(), THETA.clone().requires_grad_()
    out = StepFunction.apply(z, theta, EPS)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]], [[0.0, 1.0]]]))
    out.backward(G)
    # no gradient to z; ∂/∂θ = Σ_b −(1/ε)·K·g: θ0 −5·(1 + 3) = −20, θ1 −5·(−1 + 4) = −15
    assert z.grad is None
    torch.testing.assert_close(theta.grad, torch.tensor([[-20.0, -15.0]]))


def test_straight_through_to_input_gives_z_the_negated_kernel_gradient():
    # ste_to_input (Anthropic, Jan 2025): the jump's pseudo-derivative also reaches z, +(θ/ε)·K·g for
    # JumpReLU and +(1/ε)·K·g for the step, per entry; θ's gradient is unchanged.
    for fn, theta_grad, jump in ((JumpReLUFunction, [[-10.0, -15.0]], torch.tensor([[2.5, 5.0]])),
                                 (StepFunction, [[-20.0, -15.0]], torch.tensor([[5.0, 5.0]]))):
        z, theta = Z.clone().requires_grad_(), THETA.clone().requires_grad_()
        fn.apply(z, theta, EPS, True).backward(G)
        in_window = ((Z - THETA).abs() < EPS / 2).float()  # latent 0: tokens 0, 1; latent 1: tokens 1, 2
        through_gate = (Z > THETA).float() * G if fn is JumpReLUFunction else 0
        torch.testing.assert_close(z.grad, through_gate + jump * in_window * G)
        torch.testing.assert_close(theta.grad, torch.tensor(theta_grad))
    # the L0 penalty then lowers the pre-activations in the band (their gradient is positive)
    act = JumpReLU(1.0, "l0", EPS, init_threshold=0.5, tanh_scale=4.0, pre_act_coef=0.0, ste_to_input=True)
    act.init_threshold(1, 2)
    with torch.no_grad():
        act.log_threshold.copy_(THETA.log())
    assert not act.elementwise  # z needs autograd: the dense backward
    z = Z.clone().requires_grad_()
    act.penalty(z, act(z), torch.ones(1, 2)).backward()
    torch.testing.assert_close(z.grad, 5.0 * ((Z - THETA).abs() < EPS / 2).float() / Z.shape[0])


def test_jumprelu_module_gradient_reaches_log_threshold():
    act = JumpReLU(sparsity_coef=0.0, penalty="l0", bandwidth=EPS, init_threshold=0.5, tanh_scale=4.0,
                   pre_act_coef=0.0)
    act.init_threshold(1, 2)
    with torch.no_grad():
        act.log_threshold.copy_(THETA.log())
    assert act.log_threshold.dtype == torch.float32
    (act(Z).values * G).sum().backward()
    # chain rule through θ = exp(log θ): ∂/∂log θ = θ·∂/∂θ = (0.5·−10, 1·−15)
    torch.testing.assert_close(act.log_threshold.grad, torch.tensor([[-5.0, -15.0]]))


def test_jumprelu_threshold_gradient_matches_finite_difference_of_the_mean():
    # z uniform on [0, 2] (density ½): d/dθ mean(z·H(z−θ)) = −θ·p(θ) = −0.5 at θ = 1. The STE is a
    # kernel density estimate of that derivative.
    z = torch.linspace(0, 2, 20001)[:, None, None]
    theta = torch.ones(1, 1, requires_grad=True)
    JumpReLUFunction.apply(z, theta, 0.1).mean().backward()
    h = 0.05
    finite = (JumpReLUFunction.apply(z, theta.detach() + h, 0.1).mean()
              - JumpReLUFunction.apply(z, theta.detach() - h, 0.1).mean()) / (2 * h)
    assert theta.grad.item() == pytest.approx(-0.5, abs=2e-3)
    assert finite.item() == pytest.approx(-0.5, abs=2e-3)


def test_jumprelu_thresholds_are_per_layer_and_latent():
    act = JumpReLU(0.1, "l0", 0.1, init_threshold=1.0, tanh_scale=4.0, pre_act_coef=0.0)
    act.init_threshold(3, 2)
    with torch.no_grad():
        act.log_threshold.copy_(torch.tensor([[0.5, 1.0], [1.5, 2.0], [2.5, 3.0]]).log())
    pre = torch.tensor([[[0.6, 0.9], [1.6, 2.1], [2.4, 3.1]]])
    torch.testing.assert_close(act(pre).values, torch.tensor([[[0.6, 0.0], [1.6, 2.1], [0.0, 3.1]]]))


def random_pre(B: int, L: int, F: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, L, F, generator=torch.Generator().manual_seed(seed))


def test_topk_keeps_the_k_largest_per_token_and_layer():
    pre = random_pre(16, 3, 40)
    latents = TopK(k=5, k_aux=None, aux_coef=0.0)(pre)
    assert latents.values.shape == (16, 3, 5)
    assert ((latents.values > 0).sum(-1) == 5).all()
    kth = pre.sort(-1, descending=True).values[..., 4:5]
    torch.testing.assert_close(latents.dense(), pre * (pre >= kth))
    torch.testing.assert_close(latents.l0(), torch.full((3,), 5.0))


def test_topk_relus_negative_selections():
    latents = TopK(k=2, k_aux=None, aux_coef=0.0)(torch.tensor([[[-1.0, 0.5, -3.0, -0.2]]]))
    torch.testing.assert_close(latents.dense(), torch.tensor([[[0.0, 0.5, 0.0, 0.0]]]))


def batchtopk(k: int, per_layer: bool = True, momentum: float = 0.9, n_layers: int = 1, n_latents: int = 40):
    act = BatchTopK(k=k, k_aux=None, aux_coef=0.0, threshold_momentum=momentum, per_layer=per_layer)
    act.init_threshold(n_layers, n_latents)
    return act


def test_batchtopk_selects_k_times_batch_over_the_batch():
    pre = random_pre(16, 1, 40)
    latents = batchtopk(k=3)(pre)
    assert (latents.values != 0).sum() == 3 * 16
    # exactly the 48 largest pre-activations of the batch, wherever they fall
    cutoff = pre.flatten().sort(descending=True).values[47]
    torch.testing.assert_close(latents.dense(), pre * (pre >= cutoff))
    per_token = (latents.dense() != 0).sum(-1).flatten()
    assert per_token.min() < 3 < per_token.max()  # adaptive per token, unlike TopK


def test_batchtopk_is_exact_when_one_token_holds_most_of_the_selection():
    """Token 0 is loud: it alone holds more of the batch's k·B largest than the first candidate
    search (2k per token) looks at, so the search must widen to stay exact."""
    pre = random_pre(16, 1, 40)
    pre[0] = pre[0].abs() * 100
    latents = batchtopk(k=2)(pre)
    cutoff = pre.flatten().sort(descending=True).values[31]
    torch.testing.assert_close(latents.dense(), pre * (pre >= cutoff))
    assert (latents.dense()[0] != 0).sum() == 32 > 2 * 2


def test_batchtopk_stays_exact_while_its_candidate_width_follows_the_batches():
    """The search width adapts to the previous batch's busiest token (a loud batch widens it, a
    quiet one narrows it); every batch's selection is still exactly its k·B largest."""
    act = batchtopk(k=2)
    widths = []
    for loudness in (1.0, 100.0, 1.0, 30.0):
        pre = random_pre(16, 1, 40)
        pre[0] = pre[0].abs() * loudness
        latents = act(pre)
        cutoff = pre.flatten().sort(descending=True).values[31]
        torch.testing.assert_close(latents.dense(), pre * (pre >= cutoff))
        widths.append(act.n_candidates)
    assert widths[1] > widths[0] and widths[2] < widths[1]


def test_batchtopk_per_layer_selects_k_times_batch_in_every_layer():
    scales = torch.tensor([1.0, 3.0, 0.3])[None, :, None]  # layers of very different scale
    pre = random_pre(16, 3, 40) * scales
    latents = batchtopk(k=3, per_layer=True, n_layers=3)(pre)
    torch.testing.assert_close((latents.dense() != 0).sum((0, 2)), torch.tensor([48, 48, 48]))


def test_batchtopk_across_layers_selects_k_times_batch_times_layers_overall():
    scales = torch.tensor([1.0, 3.0, 0.3])[None, :, None]
    pre = random_pre(16, 3, 40) * scales
    act = batchtopk(k=3, per_layer=False, n_layers=3)
    latents = act(pre)
    count_L = (latents.dense() != 0).sum((0, 2))
    assert count_L.sum() == 3 * 16 * 3
    assert count_L[1] > 48 > count_L[2]  # the loud layer takes more than its share
    cutoff = pre.flatten().sort(descending=True).values[3 * 16 * 3 - 1]
    torch.testing.assert_close(latents.dense(), pre * (pre >= cutoff))
    # one selection, so one inference threshold for every layer: the smallest selected value
    torch.testing.assert_close(act.threshold, torch.full((3, 40), cutoff.item()))


def test_batchtopk_threshold_is_an_ema_of_the_smallest_selected_activation():
    act = batchtopk(k=1, momentum=0.9, n_latents=3)
    # batch 1: the 2 largest are 4 and 3 → threshold 3 (the first estimate is taken as is)
    act(torch.tensor([[[3.0, 1.0, 2.0]], [[0.5, 4.0, -1.0]]]))
    torch.testing.assert_close(act.threshold, torch.full((1, 3), 3.0))
    # batch 2: the 2 largest are 5 and 2.5 → 0.9·3 + 0.1·2.5
    act(torch.tensor([[[5.0, 0.2, 0.1]], [[1.5, 0.3, 2.5]]]))
    torch.testing.assert_close(act.threshold, torch.full((1, 3), 2.95))
    act.eval()
    dense = act(torch.tensor([[[3.0, 2.96, 2.9]]])).dense()
    torch.testing.assert_close(dense, torch.tensor([[[3.0, 2.96, 0.0]]]))
    torch.testing.assert_close(act.threshold, torch.full((1, 3), 2.95))  # eval does not update it


@pytest.mark.parametrize("per_layer", [True, False])
def test_batchtopk_inference_does_not_depend_on_the_batch(per_layer):
    act = batchtopk(k=4, per_layer=per_layer, momentum=0.5, n_layers=3)
    for seed in range(5):
        act(random_pre(32, 3, 40, seed=seed))
    act.eval()
    pre = random_pre(24, 3, 40, seed=99)
    together = act(pre).dense()
    alone = torch.cat([act(pre[i:i + 1]).dense() for i in range(24)])
    torch.testing.assert_close(together, alone)
    # and the same rows among other rows: appending a batch of loud rows changes nothing
    mixed = act(torch.cat([pre, 10 * random_pre(8, 3, 40, seed=7)])).dense()[:24]
    torch.testing.assert_close(mixed, together)
    # in training mode it does depend on the batch: the loud rows take the selection
    act.train()
    trained = act(torch.cat([pre, 10 * random_pre(8, 3, 40, seed=7)])).dense()[:24]
    assert (trained != 0).sum() < (act(pre).dense() != 0).sum()
    # the inference L0 is near the training target k (thresholds estimated on similar batches)
    l0 = (together != 0).sum(-1).float().mean()
    assert 2 < l0 < 8


def test_dense_round_trips_through_the_sparse_form():
    dense = torch.relu(random_pre(6, 2, 10)) * (random_pre(6, 2, 10, seed=1) > 0.5)
    sparse = dense_to_sparse(dense)
    assert sparse.indices is not None and sparse.values.shape[-1] == int((dense != 0).sum(-1).max())
    torch.testing.assert_close(sparse.dense(), dense)
    topk = TopK(k=3, k_aux=None, aux_coef=0.0)(random_pre(6, 2, 10))
    again = dense_to_sparse(topk.dense())
    torch.testing.assert_close(again.dense(), topk.dense())
    plain = Latents(dense, None, 10)
    assert plain.dense() is dense


def test_dense_to_sparse_of_all_zeros_keeps_one_padded_slot():
    sparse = dense_to_sparse(torch.zeros(2, 1, 5))
    assert sparse.values.shape == (2, 1, 1) and (sparse.values == 0).all()
    assert math.isclose(sparse.l0().item(), 0.0)
