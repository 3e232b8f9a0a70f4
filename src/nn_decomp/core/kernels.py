"""Sparse training kernels: gradients from the selected latents only.

The dense reference (coder.py: einsum, then `topk`) spends three B·D·F GEMMs per step: the
pre-activations, and in the backward grad_W_enc = Gᵀ·x and grad_x = G·W_enc, where G is a dense
[B, L, F] gradient with k non-zeros per row. Here selection runs on detached pre-activations and
the backward touches only the B·k selected entries (the design of sparsify's fused encoder):
O(B·k·D) work and no [B, L, F] gradient.

Every sparse product is one `F.embedding_bag` in 'sum' mode with per-sample weights, fbgemm's
fastest CPU path, over the entries that count (`selected_entries`: variable-length bags, so
padding costs nothing): the decoder's forward and weight gradient over the non-zero values, its
value gradient over `Latents.grad_mask` (what the activation's backward uses), the encoder's
backward over the entries with a non-zero gradient. To sum over tokens per latent (grad_W_enc, grad_W_dec) the
entries are regrouped by latent (`latent_sums`): each latent is a bag of the token rows that chose it.
Measured on 2 CPU cores, B=4096, D=576, F=9216, k=32, for grad_W_enc: index_add_ of outer
products 600 ms, COO `sparse.mm` 170 ms, CSR (MKL) 550 ms, dense scatter + GEMM 2100 ms,
latent bags 25 ms + 2 ms to sort. The same regrouping replaces `embedding_bag`'s own weight
backward in the decoder (≈250 ms → ≈30 ms).

W_enc is stored [L, F, D] (as sparsify and nn.Linear do): a latent's encoder row is contiguous, so
the latent bags write grad_W_enc and gather grad_x with no transposed copy of a [D, F] matrix
(2 × ≈10 ms a step at the shapes above), and the forward GEMM is as fast as with [D, F].

Contract of the sparse encoder: activations of the TopK family (TopK, BatchTopK, AuxK's dead
top-k) output values ≥ 0 that are either a selected pre-activation or 0 (ReLU'd, or padding).
So any such `Latents`, computed without autograd, gets its gradient back by `attach_encoder_grad`:
d value/d pre = 1 where value ≠ 0, else 0, exactly the dense path's ReLU·mask derivative.
Elementwise activations (ReLU, JumpReLU) have sparse outputs too: the same backward carries the
gradient of the raw pre-activations gathered at their `support`, and the activation (with its own
straight-through θ-gradient) then runs on those [B, L, K] entries instead of [B, L, F].
"""
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nn_decomp.core.activations import Activation, Latents
from nn_decomp.core.shard import NO_SHARD, LatentShard


class Entries(NamedTuple):
    """The entries of a [B, K] selection that count, flat, as variable-length bags per token row:
    padding costs nothing downstream (BatchTopK pads every row to its busiest one's K).

    latents:  [N] latent id of each entry;     weights: [N] its value (or gradient)
    rows:     [N] token row of each entry;     offsets: [B] start of each row's bag (embedding_bag's)
    position: [N] flat position in the [B, K] selection
    """

    latents: Tensor
    weights: Tensor
    rows: Tensor
    offsets: Tensor
    position: Tensor


def selected_entries(indices_BK: Tensor, weights_BK: Tensor, keep_BK: Tensor) -> Entries:
    B, K = indices_BK.shape
    position = keep_BK.reshape(-1).nonzero().squeeze(1)
    count_B = keep_BK.sum(1)
    offsets = torch.cumsum(count_B, 0) - count_B
    return Entries(indices_BK.reshape(-1)[position], weights_BK.reshape(-1)[position], position // K,
                   offsets, position)


def row_sums(e: Entries, table_FX: Tensor) -> Tensor:
    """[B, X]: out[b] = Σ over row b's entries of weight · table[latent]."""
    return F.embedding_bag(e.latents, table_FX, e.offsets, mode="sum", per_sample_weights=e.weights.to(table_FX.dtype))


def latent_sums(e: Entries, rows_BX: Tensor, n_latents: int) -> Tensor:
    """[F, X]: out[f] = Σ over the entries of latent f of weight · rows[row]. The entries regrouped
    by latent (latent f's bag: the tokens that chose it), then one embedding_bag."""
    # int32 keys: torch 2.13's 2-thread CPU sort of int64 took 280 ms where int32 took 2 ms.
    keys, order = e.latents.to(torch.int32).sort()
    latents_F = torch.arange(n_latents, dtype=torch.int32, device=keys.device)
    offsets_F = torch.searchsorted(keys, latents_F)  # first position of each latent, sorted
    return F.embedding_bag(e.rows[order], rows_BX.contiguous(), offsets_F, mode="sum",
                           per_sample_weights=e.weights[order].to(rows_BX.dtype))


def entry_dots(e: Entries, table_FX: Tensor, grad_BX: Tensor) -> Tensor:
    """[N]: table[latent] · grad[row] per entry, without gathering an [N, X] tensor.

    This is the per-sample-weight gradient of `embedding_bag`, so aten's own kernel for it does the
    work (a private, `_`-prefixed op; tests/test_kernels.py pins it): 52 ms where a chunked
    gather + bmm takes 300 ms (2 cores, B=4096, k=32, X=576)."""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad_BX.contiguous(), table_FX, e.latents, e.offsets, e.rows, 0)  # mode 0 = sum


# --- encoder ------------------------------------------------------------------------------


def encode_pre(x_BLD: Tensor, W_enc_LFD: Tensor, b_enc_LF: Tensor, out_LBF: Tensor | None = None) -> Tensor:
    """[B, L, F] x·W_encᵀ + b_enc, the bias fused into the GEMM (baddbmm): no extra [B, L, F] pass.
    The result is a [L, B, F] tensor (written into `out_LBF` if given) seen as [B, L, F]."""
    return torch.baddbmm(b_enc_LF[:, None], x_BLD.transpose(0, 1), W_enc_LFD.transpose(1, 2),
                         out=out_LBF).transpose(0, 1)


class _EncodeSelected(torch.autograd.Function):
    """values_BLK, computed without autograd from pre = x·W_enc + b_enc, gain their gradient:
    ∂value[b,l,j]/∂pre[b,l,indices[b,l,j]] = 1 where the value is non-zero, else 0. Backward:
        grad_b_enc[l, f] = Σ g[b,l,j]                 over (b, j) with indices = f
        grad_W_enc[l, f] = Σ g[b,l,j] · x[b, l]        (latent bags)
        grad_x[b, l] = Σ_j g[b,l,j] · W_enc[l, indices[b,l,j]]
    """

    @staticmethod
    def forward(ctx, values_BLK, indices_BLK, x_BLD, W_enc_LFD, b_enc_LF):
        ctx.save_for_backward(indices_BLK, values_BLK != 0, x_BLD, W_enc_LFD)
        return values_BLK.clone()

    @staticmethod
    def backward(ctx, grad_BLK):
        indices_BLK, live_BLK, x_BLD, W_enc_LFD = ctx.saved_tensors
        L, n_latents = W_enc_LFD.shape[:2]
        grad_x = torch.empty_like(x_BLD) if ctx.needs_input_grad[2] else None
        grad_b = W_enc_LFD.new_zeros(L, n_latents) if ctx.needs_input_grad[4] else None
        grad_W = []
        # Entries whose gradient is 0 add nothing: JumpReLU's band below θ (gathered for θ's own
        # gradient, ∂output/∂pre = 0 there) is most of its support and costs nothing here.
        keep_BLK = live_BLK & (grad_BLK != 0)
        for l in range(L):
            e = selected_entries(indices_BLK[:, l], grad_BLK[:, l], keep_BLK[:, l])
            if grad_b is not None:
                grad_b[l].index_add_(0, e.latents, e.weights.to(grad_b.dtype))
            if ctx.needs_input_grad[3]:
                grad_W.append(latent_sums(e, x_BLD[:, l], n_latents))
            if grad_x is not None:
                grad_x[:, l] = row_sums(e, W_enc_LFD[l])
        # One layer: a view, not a copy of the [F, D] gradient.
        grad_W = (grad_W[0][None] if L == 1 else torch.stack(grad_W)) if grad_W else None
        return None, None, grad_x, grad_W, grad_b


def attach_encoder_grad(latents: Latents, x_BLD: Tensor, W_enc_LFD: Tensor, b_enc_LF: Tensor) -> Latents:
    """The same latents, their values now differentiable w.r.t. x, W_enc, b_enc through the sparse
    backward. `latents` must be sparse, computed from `encode_pre(x, W_enc, b_enc)`, each value
    either the pre-activation at its index or 0."""
    assert latents.indices is not None, "attach_encoder_grad needs sparse latents"
    values = _EncodeSelected.apply(latents.values, latents.indices, x_BLD, W_enc_LFD, b_enc_LF)
    return latents._replace(values=values)


def gather_support(pre_BLF: Tensor, support_BLF: Tensor) -> Latents:
    """The pre-activations at `support`, packed per (token, layer) into K = the largest count.
    topk pads shorter rows with distinct latents outside the support (no duplicate indices), whose
    true pre-activations give, through an elementwise activation, the dense path's exact zeros.
    The support is the grad mask: a padding entry's value gradient is never used (a few loud tokens
    pad every row ~7× on SmolLM2, so the decoder would compute mostly those)."""
    k = max(int(support_BLF.sum(-1, dtype=torch.int32).max()), 1)
    # -inf outside the support: topk's candidate filter then skips most entries (3x faster on CPU).
    indices = torch.where(support_BLF, pre_BLF, -torch.inf).topk(k, dim=-1, sorted=False).indices
    return Latents(pre_BLF.gather(-1, indices), indices, pre_BLF.shape[-1], support_BLF.gather(-1, indices))


def sparse_encode(x_BLD: Tensor, W_enc_LFD: Tensor, b_enc_LF: Tensor, activation: Activation,
                  out_LBF: Tensor | None = None) -> tuple[Latents, Tensor]:
    """Encode with the sparse backward. Returns the latents and the detached pre-activations (for
    AuxK: `aux_topk_latents`), written into `out_LBF` if given. A TopK-family activation selects
    without autograd (keeping its own state updates); an elementwise one runs on the
    pre-activations gathered at its support."""
    with torch.no_grad():
        pre_BLF = encode_pre(x_BLD, W_enc_LFD, b_enc_LF, out_LBF)
        if activation.sparse_output:
            latents = activation(pre_BLF)
        else:
            latents = gather_support(pre_BLF, activation.support(pre_BLF))
    latents = attach_encoder_grad(latents, x_BLD, W_enc_LFD, b_enc_LF)
    return (latents if activation.sparse_output else activation(latents)), pre_BLF


class SparseEncoding(NamedTuple):
    """values: [B, L, k] ReLU'd top-k pre-activations (differentiable, sparse backward).
    indices: [B, L, k] their latent ids. pre_acts: [B, L, F] detached pre-activations."""

    values: Tensor
    indices: Tensor
    pre_acts: Tensor


def fused_topk_encode(x_BLD: Tensor, W_enc_LFD: Tensor, b_enc_LF: Tensor, k: int) -> SparseEncoding:
    """TopK encoder (Gao et al. 2024): one dense GEMM forward, a backward from the B·k selected latents."""
    with torch.no_grad():
        pre_BLF = encode_pre(x_BLD, W_enc_LFD, b_enc_LF)
        values, indices = pre_BLF.topk(k, dim=-1, sorted=False)
        values.relu_()
    values = _EncodeSelected.apply(values, indices, x_BLD, W_enc_LFD, b_enc_LF)
    return SparseEncoding(values, indices, pre_BLF)


def aux_topk_latents(pre_BLF: Tensor, dead_LF: Tensor, k_aux: int, x_BLD: Tensor, W_enc_LFD: Tensor,
                     b_enc_LF: Tensor, shard: LatentShard = NO_SHARD) -> Latents:
    """AuxK's selection (Gao et al. 2024, App. B.1): the top k_aux dead latents per token, ReLU'd,
    with the sparse backward. `pre_BLF` is the detached output of `encode_pre`. Layers with fewer
    than k_aux dead latents pick −inf entries: value 0, no gradient (as in losses.aux_k_loss).
    Tensor parallel: this shard's entries of the top k_aux over every shard."""
    with torch.no_grad():
        # Select among the dead columns only: a [B, n_dead] copy, not a masked [B, L, F] one (a
        # quarter of the pass when a quarter is dead); layers with fewer pad with −inf.
        values, indices = [], []
        for l, dead_F in enumerate(dead_LF):
            dead_ids = dead_F.nonzero().squeeze(1)
            pad = (0, max(k_aux - len(dead_ids), 0))
            v, i = F.pad(pre_BLF[:, l].index_select(-1, dead_ids), pad, value=-torch.inf).topk(k_aux, dim=-1,
                                                                                               sorted=False)
            values.append(v)
            indices.append(F.pad(dead_ids, pad)[i])  # padding picks (−inf): latent 0, value 0, no gradient
        values, indices = shard.top_per_row(torch.stack(values, 1).relu_(), k_aux), torch.stack(indices, 1)
    latents = Latents(values, indices, pre_BLF.shape[-1], values != 0)
    return attach_encoder_grad(latents, x_BLD, W_enc_LFD, b_enc_LF)


# --- decoder ------------------------------------------------------------------------------


class _DecodeSource(torch.autograd.Function):
    """out[b] = Σ_j values[b, j] · W[indices[b, j]] (one source layer; W is [F, X], X = targets·D),
    over the non-zero values only. Backward: grad_W = latent bags of grad_out weighted by values
    (rows no token selected get 0); grad_values = W[indices]·grad_out (entry_dots) at the entries
    of `grad_mask_BK` (every entry if None), 0 elsewhere."""

    @staticmethod
    def forward(ctx, indices_BK, values_BK, W_FX, grad_mask_BK):
        nonzero = selected_entries(indices_BK, values_BK, values_BK != 0)
        ctx.save_for_backward(indices_BK, values_BK, W_FX, grad_mask_BK, *nonzero)
        return row_sums(nonzero, W_FX)

    @staticmethod
    def backward(ctx, grad_BX):
        indices_BK, values_BK, W_FX, grad_mask_BK, *nonzero = ctx.saved_tensors
        nonzero = Entries(*nonzero)
        grad_values = grad_W = None
        if ctx.needs_input_grad[1]:
            e = selected_entries(indices_BK, values_BK, grad_mask_BK)
            grad_values = values_BK.new_zeros(values_BK.numel())
            grad_values[e.position] = entry_dots(e, W_FX, grad_BX).to(values_BK.dtype)
            grad_values = grad_values.view_as(values_BK)
        if ctx.needs_input_grad[2]:
            grad_W = latent_sums(nonzero, grad_BX, W_FX.shape[0])
        return None, grad_values, grad_W, None


def decode_source(indices_BK: Tensor, values_BK: Tensor, W_FX: Tensor, grad_mask_BK: Tensor | None = None) -> Tensor:
    """[B, X] decoder output of one source layer; drop-in for `F.embedding_bag(indices, W,
    per_sample_weights=values, mode="sum")` with a backward that costs O(B·k·X). `grad_mask_BK`:
    the entries whose value's gradient is wanted (`Latents.grad_mask`); the rest get 0."""
    if grad_mask_BK is None:
        grad_mask_BK = torch.ones_like(values_BK, dtype=torch.bool)
    return _DecodeSource.apply(indices_BK.contiguous(), values_BK.contiguous(), W_FX, grad_mask_BK.contiguous())


class _AddWrites(torch.autograd.Function):
    """base + each write added at layers [start, start + width): the forward adds into one buffer,
    the backward hands each write its slice of the output gradient, a view. (Adding into slices of
    a tensor under autograd instead makes it clone and zero-fill the whole [B, L, D] gradient once
    per write: L² traffic for a CLT, L³ tied; at 30 layers more than half of a CPU step.)"""

    @staticmethod
    def forward(ctx, base_BLD: Tensor, starts: tuple[int, ...], *writes_BXD: Tensor) -> Tensor:
        out_BLD = base_BLD.clone()
        for start, w_BXD in zip(starts, writes_BXD):
            out_BLD[:, start:start + w_BXD.shape[1]] += w_BXD
        ctx.spans = [(start, start + w.shape[1]) for start, w in zip(starts, writes_BXD)]
        return out_BLD

    @staticmethod
    def backward(ctx, grad_BLD: Tensor):
        return grad_BLD, None, *(grad_BLD[:, start:stop] for start, stop in ctx.spans)


def add_writes(base_BLD: Tensor, starts: Sequence[int], writes_BXD: Sequence[Tensor]) -> Tensor:
    """[B, L, D] base_BLD plus every writes_BXD[n] [B, X_n, D] at layers starts[n] .. starts[n] + X_n."""
    return _AddWrites.apply(base_BLD, tuple(starts), *writes_BXD)


def sparse_decode(latents: Latents, W_dec: Sequence[Tensor], d_out: int) -> Tensor:
    """[B, L, D_out] Σ over source layers i of latents[:, i] · W_dec[i] (W_dec[i]: [F, L−i, D_out]),
    no bias. One bag per (token, source): cost ∝ k·(L−i)·D_out, independent of F."""
    B, L, _ = latents.values.shape
    out_BLD = decode_source(latents.indices[:, 0], latents.values[:, 0], W_dec[0].flatten(1)).view(B, L, d_out)
    for i in range(1, L):  # source i writes targets i..L−1: pad the earlier targets with zeros
        out_BX = decode_source(latents.indices[:, i], latents.values[:, i], W_dec[i].flatten(1))
        out_BLD = out_BLD + F.pad(out_BX.view(B, L - i, d_out), (0, 0, i, 0))
    return out_BLD
