"""Sparsifying activations: small modules that turn pre-activations into latents.

Every activation maps pre-activations `pre_BLF` (batch, source layer, latent) to `Latents`, and
adds its own sparsity penalty. The coder (coder.py) never knows which activation it holds.
Elementwise ones (ReLU, JumpReLU) also run on sparse pre-activations: the entries of their support.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nn_decomp.config.act import PENALTIES
from nn_decomp.core.shard import NO_SHARD


class Latents(NamedTuple):
    """Activations of a batch. Sparse when `indices` is set, else dense.

    values:  [B, L, K] activation of each selected latent (0 marks padding), or [B, L, F] dense.
    indices: [B, L, K] latent id of each value, or None for dense values.
    n_latents: F, the dictionary size per layer.
    grad_mask: [B, L, K] the entries whose value's gradient is used (sparse only: the non-zero values
        of the TopK family, the support gathered for an elementwise activation); the sparse decoder
        computes no other (kernels.decode_source). None: every entry.
    """

    values: Tensor
    indices: Tensor | None
    n_latents: int
    grad_mask: Tensor | None = None

    def dense(self) -> Tensor:
        if self.indices is None:
            return self.values
        shape = (*self.values.shape[:-1], self.n_latents)
        return self.values.new_zeros(shape).scatter_add(-1, self.indices, self.values)

    def fired(self) -> Tensor:
        """[L, F] bool: which latents were non-zero anywhere in the batch (sparse: no [B, L, F])."""
        if self.indices is None:
            return (self.values.detach() != 0).any(dim=0)
        L = self.indices.shape[1]
        fired = torch.zeros(L * self.n_latents, dtype=torch.bool, device=self.indices.device)
        fired[self._flat_indices()[self.values.detach() != 0]] = True
        return fired.view(L, self.n_latents)

    def at(self, t: Tensor) -> Tensor:
        """`t` aligned with `values`: a per-latent [L, F] or per-entry [B, L, F] tensor as is when
        dense (it broadcasts), else gathered at the indices into [B, L, K]. Sparse: the [L, F]
        gather's backward costs O(B·L·K); a [B, L, F] `t` must not need a gradient (a dense one)."""
        if self.indices is None:
            return t
        if t.dim() == 3:
            return t.gather(-1, self.indices)
        return t.reshape(-1)[self._flat_indices()]

    def _flat_indices(self) -> Tensor:
        """[B, L, K] positions of the indices in a flattened [L, F] tensor."""
        L = self.indices.shape[1]
        return self.indices + torch.arange(L, device=self.indices.device)[:, None] * self.n_latents

    def l0(self) -> Tensor:
        """[L]: mean number of non-zero latents per token, per source layer."""
        return (self.values != 0).float().sum(-1).mean(0)


def dense_to_sparse(values_BLF: Tensor) -> Latents:
    """Pack dense activations into the padded sparse form (K = max non-zeros in any row)."""
    n_latents = values_BLF.shape[-1]
    k_max = max(int((values_BLF != 0).sum(-1).max()), 1)
    idx = values_BLF.abs().topk(k_max, dim=-1, sorted=False).indices
    return Latents(values_BLF.gather(-1, idx), idx, n_latents)


def as_latents(pre: Tensor | Latents) -> Latents:
    """Pre-activations as `Latents`: a dense [B, L, F] tensor, or already sparse (kernels.py)."""
    return pre if isinstance(pre, Latents) else Latents(pre, None, pre.shape[-1])


def rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """JumpReLU_θ(z) = z·H(z−θ) with the straight-through pseudo-derivative of Rajamanoharan et
    al. 2024 (eq. 11): ∂/∂θ = −(θ/ε)·K((z−θ)/ε), K the rectangle kernel; ∂/∂z = H(z−θ).
    ste_to_input: the jump's pseudo-derivative reaches z too, +(θ/ε)·K (it depends on z−θ only),
    as in Anthropic's January 2025 setup (SAELens' `jumprelu_ste_to_input`)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool = False) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        jump = (threshold / ctx.bandwidth) * rectangle((pre - threshold) / ctx.bandwidth) * grad_out
        grad_pre = (pre > threshold) * grad_out + (jump if ctx.ste_to_input else 0)
        return grad_pre, _sum_to(-jump, threshold.shape), None, None


class StepFunction(torch.autograd.Function):
    """H(z−θ) with ∂/∂θ = −(1/ε)·K((z−θ)/ε) and no gradient to z (Rajamanoharan et al. eq. 12);
    with ste_to_input, ∂/∂z = +(1/ε)·K((z−θ)/ε) (Anthropic, January 2025)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool = False) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        jump = (1.0 / ctx.bandwidth) * rectangle((pre - threshold) / ctx.bandwidth) * grad_out
        return (jump if ctx.ste_to_input else None), _sum_to(-jump, threshold.shape), None, None


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient [B, L, F] back to the parameter's shape [L, F]."""
    return grad.sum(0) if grad.dim() > len(shape) else grad


class Activation(nn.Module):
    """Base: no penalty, decoder norm free, no dead-latent auxiliary loss."""

    unit_norm_decoder = False
    uses_aux_loss = False
    # True: forward returns sparse Latents whose values are either a selected pre-activation or 0,
    # so the coder may select without autograd and use kernels.py's sparse backward.
    sparse_output = False
    # True: forward and penalty act latent by latent, on dense pre-activations or on sparse ones
    # (`Latents`); `support(pre_BLF)` marks every entry whose output or gradient may be non-zero,
    # so the coder may gather those alone and use kernels.py's sparse backward.
    elementwise = False
    # True: the coder scales each token's input to norm √d_in before encoding and the reconstruction
    # back after decoding (coder.token_scale), so the activation compares tokens on one scale.
    token_norm = False
    # this rank's share of the latents under tensor parallelism (shard.py); set by SparseCoder.set_shard
    shard = NO_SHARD

    # forward(pre, layers=slice(None)): `layers` names the source layers pre's L axis holds, so that
    # per-layer parameters (thresholds) apply to the right ones: the replacement model encodes one
    # layer at a time (SparseCoder.encode_layer).

    def penalty(self, pre_BLF: Tensor, latents: Latents, dec_norm_LF: Tensor, progress: float = 1.0) -> Tensor:
        """progress: the fraction of training done, for a penalty that changes over training."""
        return pre_BLF.new_zeros(())


class ReLU(Activation):
    """ReLU with an L1 penalty weighted by decoder norm (Anthropic, April 2024 update):
    l1_coef · Σ_f f_i · ‖W_dec,i‖, summed over latents, averaged over tokens.

    p_end < 1 anneals the penalty to l1_coef · Σ_f (f_i · ‖W_dec,i‖)^p (Karvonen et al. 2024's
    p-annealing; dictionary_learning's PAnnealTrainer with its Lp^p penalty): p is 1 until the fraction
    `anneal_start` of training, then falls linearly to p_end at its end. Below 1 the penalty's slope is
    steep for a small activation and shallow for a large one, so interference is pushed to zero without
    shrinking the features kept, which is what an L1 penalty strong enough for a low L0 does. Unlike
    dictionary_learning, the coefficient is not re-scaled as p falls: the sweep over l1_coef sets L0."""

    elementwise = True

    def __init__(self, l1_coef: float, token_norm: bool = False, p_end: float = 1.0, anneal_start: float = 0.5):
        super().__init__()
        self.l1_coef, self.token_norm, self.p_end, self.anneal_start = l1_coef, token_norm, p_end, anneal_start

    def exponent(self, progress: float) -> float:
        """p at `progress`, the fraction of training done (1 after training)."""
        annealed = max(0.0, progress - self.anneal_start) / (1 - self.anneal_start)
        return 1.0 - (1.0 - self.p_end) * min(1.0, annealed)

    def support(self, pre_BLF: Tensor) -> Tensor:
        return pre_BLF > 0

    def forward(self, pre: Tensor | Latents, layers: slice = slice(None)) -> Latents:
        pre = as_latents(pre)
        return pre._replace(values=torch.relu(pre.values))

    def penalty(self, pre_BLF, latents, dec_norm_LF, progress=1.0):
        weighted = latents.values * latents.at(dec_norm_LF)
        if (p := self.exponent(progress)) < 1:
            # 0^p's gradient is infinite: the zeros of the dense path take no part
            active = weighted > 0
            weighted = torch.where(active, torch.where(active, weighted, 1.0).pow(p), 0.0)
        return self.l1_coef * self.shard.sum(weighted.sum((-1, -2)).mean())


class TopK(Activation):
    """Keep the k largest pre-activations of each token (Gao et al. 2024), ReLU'd."""

    unit_norm_decoder = True
    uses_aux_loss = True
    sparse_output = True

    def __init__(self, k: int, k_aux: int | None, aux_coef: float, token_norm: bool = False):
        super().__init__()
        self.k, self.k_aux, self.aux_coef, self.token_norm = k, k_aux, aux_coef, token_norm

    def forward(self, pre_BLF: Tensor, layers: slice = slice(None)) -> Latents:
        values, indices = pre_BLF.topk(self.k, dim=-1, sorted=False)
        values = self.shard.top_per_row(torch.relu(values), self.k)
        return Latents(values, indices, pre_BLF.shape[-1], values != 0)


class BatchTopK(TopK):
    """Keep the k·B largest pre-activations over the whole batch (Bussmann et al. 2024); for a
    CLT, per source layer unless per_layer=False (then k·B·L over all layers). In eval mode a
    per-latent threshold replaces the batch selection, so inference L0 does not depend on the batch.
    The threshold is the paper's estimate: an exponential moving average of the smallest selected
    activation, over training batches.

    token_norm (default): every token enters at norm √d_in, as in the paper's own runs (the reference
    code's input_unit_norm=True). One selection over the batch compares tokens: without it, loud
    tokens take most of the k·B budget and quiet tokens' features are learnt late or never
    (exp_005: mean max-cos 0.61 without, 0.91 with; TopK 0.92)."""

    def __init__(self, k: int, k_aux: int | None, aux_coef: float, threshold_momentum: float,
                 per_layer: bool, token_norm: bool = True):
        super().__init__(k, k_aux, aux_coef, token_norm)
        self.threshold_momentum, self.per_layer = threshold_momentum, per_layer
        self.register_buffer("threshold", None)  # [L, F], sized by init_threshold; < 0 = not yet estimated
        # Width of the next batch's per-row candidate search: a speed hint only (any width > k
        # gives the exact selection), learnt from the previous batch's rows.
        self.n_candidates = 2 * k

    def init_threshold(self, n_layers: int, n_latents: int) -> None:
        self.threshold = torch.full((n_layers, n_latents), -1.0)

    def forward(self, pre_BLF: Tensor, layers: slice = slice(None)) -> Latents:
        if not self.training:  # the threshold is −1 until estimated: clamped, every positive entry passes
            return dense_to_sparse(pre_BLF * (pre_BLF > self.threshold[layers].clamp(min=0)))
        assert layers == slice(None), "BatchTopK selects over every layer of a batch while training"
        # The batch's k·B largest are found among each row's top candidates rather than by one
        # top-k over all B·F entries (2× the step on CPU). Exact: a row whose every candidate
        # clears the cutoff might hold more, so such rows alone search twice as wide, until none
        # is left. A row top-k costs about its width (2 cores, F = 9216: 60 ms at 32, 140 ms at
        # 128), so the width is the count 99% of the last batch's rows fit in.
        n_latents = pre_BLF.shape[-1]
        width = min(self.n_candidates, n_latents)
        values, indices = pre_BLF.topk(width, dim=-1, sorted=False)
        while True:
            cutoff_L11 = self._cutoff(values)
            b, l = (values.amin(-1) >= cutoff_L11[..., 0]).nonzero(as_tuple=True)
            # every shard searches as often as the one that searches most: each search is a collective
            if not self.shard.any(width < n_latents and len(b) > 0):
                break
            width = min(2 * width, n_latents)
            wider = pre_BLF[b, l].topk(width, dim=-1, sorted=False)
            # the other rows' new slots: −inf, so never selected (the cutoff is ≥ 0)
            values = F.pad(values, (0, width - values.shape[-1]), value=-torch.inf)
            indices = F.pad(indices, (0, width - indices.shape[-1]))
            values[b, l], indices[b, l] = wider.values, wider.indices
        keep = values >= cutoff_L11
        count_BL = keep.sum(-1)
        k_max = max(int(count_BL.max()), 1)
        self.n_candidates = max(int(count_BL.float().quantile(0.99)) + 1, self.k + 1)
        values, position = values.masked_fill(~keep, -torch.inf).topk(k_max, dim=-1, sorted=False)
        keep = values >= cutoff_L11
        values = torch.where(keep, values.relu(), 0.0)
        self._update_threshold(values, keep)
        return Latents(values, indices.gather(-1, position), pre_BLF.shape[-1], values != 0)

    def _cutoff(self, candidates_BLK: Tensor) -> Tensor:
        """[1, L, 1] the smallest selected value: the (k·B)-th largest ReLU'd entry per layer, or the
        (k·B·L)-th over all layers (B: the global batch, over every shard)."""
        B, L, _ = candidates_BLK.shape
        groups = L if self.per_layer else 1
        flat_GN = torch.relu(candidates_BLK).transpose(0, 1).reshape(groups, -1)
        cutoff_G = self.shard.kth_largest(flat_GN, self.k * B * self.shard.batch_ranks * (L // groups))
        return cutoff_G.expand(L).view(1, L, 1)

    @torch.no_grad()
    def _update_threshold(self, values_BLK: Tensor, keep_BLK: Tensor) -> None:
        smallest_L = self.shard.amin(values_BLK.masked_fill(~keep_BLK, float("inf")).amin((0, 2)).clamp(min=0))
        if not self.per_layer:  # one selection over all layers, so one cutoff (and no inf for a layer left empty)
            smallest_L = smallest_L.amin().expand_as(smallest_L)
        first = self.threshold[:, :1] < 0
        momentum = self.threshold_momentum
        ema_L1 = momentum * self.threshold[:, :1] + (1 - momentum) * smallest_L[:, None]
        self.threshold.copy_(torch.where(first, smallest_L[:, None], ema_L1).expand_as(self.threshold))


class JumpReLU(Activation):
    """JumpReLU with a learnable per-latent threshold θ = exp(log_threshold), stored in float32
    (bf16 rounds away Adam's small updates; the log keeps θ > 0 and Adam's steps relative).

    penalty="l0": sparsity_coef · Σ_f H(z−θ) (Rajamanoharan et al. 2024, unit-norm decoder).
    penalty="tanh": sparsity_coef · Σ_f tanh(tanh_scale · |f| · ‖W_dec,f‖) (Anthropic, Jan 2025).
    penalty="target": sparsity_coef · (L0 / target_l0 − 1)², L0 = Σ_f H(z−θ) averaged over the batch
    (per source layer, then averaged over layers), as dictionary_learning's JumpReLU trainer. L0's
    straight-through gradient reaches θ alone, so the coefficient only sets how tightly L0 holds the
    target, never how the dictionary trades reconstruction for sparsity elsewhere.
    pre_act_coef > 0 adds Σ_f ReLU(θ − z)·‖W_dec,f‖, which revives latents stuck below θ.
    aux_coef > 0 adds TopK's AuxK loss (losses.aux_k_loss): the top k_aux dead latents, by
    pre-activation, reconstruct the residual, which gives a latent whose θ has passed every one of its
    pre-activations a gradient again.
    ste_to_input: the straight-through gradients reach z (so the encoder) as well as θ (Anthropic,
    January 2025): the sparsity penalty then pushes pre-activations below θ, not only θ above them.
    """

    def __init__(self, sparsity_coef: float, penalty: str, bandwidth: float, init_threshold: float,
                 tanh_scale: float, pre_act_coef: float, threshold_lr_scale: float = 1.0,
                 target_l0: float | None = None, aux_coef: float = 0.0, k_aux: int | None = None,
                 ste_to_input: bool = False, token_norm: bool | None = False):
        super().__init__()
        self.ste_to_input, self.token_norm = ste_to_input, token_norm
        self.aux_coef, self.k_aux, self.uses_aux_loss = aux_coef, k_aux, aux_coef > 0
        assert penalty in PENALTIES, f"act.penalty={penalty!r}: use one of {PENALTIES}"
        assert penalty != "target" or target_l0, "penalty='target' needs target_l0"
        self.threshold_lr_scale, self.target_l0 = threshold_lr_scale, target_l0
        self.sparsity_coef, self.penalty_kind, self.bandwidth = sparsity_coef, penalty, bandwidth
        self.init_threshold_value, self.tanh_scale, self.pre_act_coef = init_threshold, tanh_scale, pre_act_coef
        self.unit_norm_decoder = penalty != "tanh"
        # The pre-activation loss reaches every latent below θ, and the L0 penalty's straight-through
        # gradient to z needs z with autograd (the sparse backward detaches it): dense, so no sparse backward.
        self.elementwise = pre_act_coef == 0 and not ste_to_input
        self.log_threshold: nn.Parameter | None = None

    def init_threshold(self, n_layers: int, n_latents: int) -> None:
        value = torch.full((n_layers, n_latents), float(self.init_threshold_value)).log()
        self.log_threshold = nn.Parameter(value.float())

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def support(self, pre_BLF: Tensor) -> Tensor:
        # Above θ, and the rectangle kernel's half band below it (θ's gradient needs the output's
        # gradient there), widened by 2% of the band so that rounding at its edge drops nothing.
        # Each entry costs a gradient dot in the decoder: a whole band below θ doubled them.
        return pre_BLF > (self.threshold - 0.51 * self.bandwidth).to(pre_BLF.dtype)

    def forward(self, pre: Tensor | Latents, layers: slice = slice(None)) -> Latents:
        pre = as_latents(pre)
        threshold = pre.at(self.threshold[layers].to(pre.values.dtype))
        return pre._replace(values=JumpReLUFunction.apply(pre.values, threshold, self.bandwidth, self.ste_to_input))

    def penalty(self, pre_BLF, latents, dec_norm_LF, progress=1.0):
        threshold = latents.at(self.threshold.to(pre_BLF.dtype))
        loss = self.sparsity_coef * self._sparsity(pre_BLF, latents, threshold, dec_norm_LF)
        if self.pre_act_coef > 0:  # dense only: elementwise is False
            pre_act = torch.relu(threshold - pre_BLF) * dec_norm_LF
            loss = loss + self.pre_act_coef * self.shard.sum(pre_act.sum((-1, -2)).mean())
        return loss

    def _sparsity(self, pre_BLF, latents, threshold, dec_norm_LF) -> Tensor:
        if self.penalty_kind == "tanh":
            return self.shard.sum(
                torch.tanh(self.tanh_scale * latents.values.abs() * latents.at(dec_norm_LF)).sum((-1, -2)).mean())
        step = StepFunction.apply(latents.at(pre_BLF), threshold, self.bandwidth, self.ste_to_input)
        if self.penalty_kind == "l0":
            return self.shard.sum(step.sum((-1, -2)).mean())
        l0_L = self.shard.batch_mean(self.shard.sum(step.sum(-1).mean(0)))  # L0 of the global batch
        return (l0_L / self.target_l0 - 1).pow(2).mean()
