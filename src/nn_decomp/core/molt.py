"""MOLT's decoder (Anthropic, "Sparse mixtures of linear transforms", 2025): each latent gates its own
low-rank map of the input, ŷ = b + Σ_t g_t(x) · U_t V_tᵀ x, instead of writing a fixed vector.

Transforms come in groups of (count, rank), e.g. a few of rank 64 and many of rank 8. Every rank
dimension of every transform is one row of V [R, D_in] and of U [R, D_out] (R = Σ count·rank), rows of
one transform contiguous. V's rows are read like encoder rows and U's like decoder rows, so the
sparse path reuses kernels.py: one dense GEMM gives x·Vᵀ for all R rows (as a transcoder's encoder
does for its latents), the rows of the active transforms alone carry gradient back
(`attach_encoder_grad`), and U is summed over those rows only (`decode_source`, an embedding_bag).
"""
import torch
from torch import Tensor, nn

from nn_decomp.core import kernels
from nn_decomp.core.activations import Latents


class LowRankTransforms(nn.Module):
    def __init__(self, groups: tuple[tuple[int, int], ...], d_in: int, d_out: int, init_norm: float):
        super().__init__()
        self.groups = tuple((int(c), int(r)) for c, r in groups)
        ranks = torch.tensor([r for c, r in self.groups for _ in range(c)])
        self.n_transforms, self.n_rows = len(ranks), int(ranks.sum())
        self.register_buffer("rank", ranks, persistent=False)  # [T]
        self.register_buffer("owner", torch.arange(len(ranks)).repeat_interleave(ranks), persistent=False)  # [R]
        # V's rows about unit norm (V·x keeps x's scale); U scaled so that every map U_t V_tᵀ starts
        # at Frobenius norm init_norm, as a transcoder's decoder vectors start at dec_init_norm.
        self.V = nn.Parameter(torch.randn(self.n_rows, d_in) / d_in ** 0.5)
        self.U = nn.Parameter(torch.randn(self.n_rows, d_out))
        with torch.no_grad():
            self.U.mul_(init_norm / self.norms()[self.owner, None])

    def layout(self):
        """(first transform, first row, count, rank) of each group."""
        t = row = 0
        for count, rank in self.groups:
            yield t, row, count, rank
            t, row = t + count, row + count * rank

    def norms(self) -> Tensor:
        """[T] ‖U_t V_tᵀ‖_F, by the rank × rank Gram matrices: trace(V Vᵀ · U Uᵀ)."""
        parts = []
        for _, row, count, rank in self.layout():
            V, U = (w[row:row + count * rank].view(count, rank, -1) for w in (self.V, self.U))
            parts.append(torch.einsum("cij,cji->c", V @ V.transpose(1, 2), U @ U.transpose(1, 2)))
        return torch.cat(parts).clamp(min=0).sqrt()

    def params_per_transform(self, d_in: int, d_out: int) -> Tensor:
        """[T] parameters of each transform's map: rank·(D_in + D_out)."""
        return self.rank * (d_in + d_out)

    def forward(self, latents: Latents, x_BD: Tensor, sparse: bool) -> Tensor:
        """[B, D_out] Σ_t g_t · U_t V_tᵀ x for gates `latents` [B, 1, ·] (values g, already offset/scaled)."""
        if not sparse:  # dense reference: every transform, masked by its gate
            gates_BR = latents.dense()[:, 0, self.owner]
            return ((x_BD @ self.V.T) * gates_BR) @ self.U
        with torch.no_grad():
            proj_BR = x_BD @ self.V.T
        out_BD = x_BD.new_zeros(x_BD.shape[0], self.U.shape[1])
        indices_BK, gates_BK = latents.indices[:, 0], latents.values[:, 0]
        # the entries whose gate's gradient is used (Latents.grad_mask; JumpReLU's band below θ: gate 0, gradient not)
        wanted_BK = torch.ones_like(gates_BK, dtype=torch.bool) if latents.grad_mask is None else latents.grad_mask[:, 0]
        for first, row, count, rank in self.layout():
            mine_BK = (indices_BK >= first) & (indices_BK < first + count) & wanted_BK
            k = int(mine_BK.sum(-1).max())
            if k > 0:
                # this group's active transforms, packed to k per token (others: gate 0, no gradient)
                pick_BK = mine_BK.to(torch.int8).topk(k, dim=-1, sorted=False).indices
                live_BK = mine_BK.gather(-1, pick_BK)
                t_BK = torch.where(live_BK, indices_BK.gather(-1, pick_BK) - first, 0)
                rows_BKr = row + t_BK[..., None] * rank + torch.arange(rank, device=x_BD.device)
                rows_BX = rows_BKr.flatten(1)
                proj_BX = proj_BR.gather(-1, rows_BX) * live_BK.repeat_interleave(rank, -1)
                proj = kernels.attach_encoder_grad(Latents(proj_BX[:, None], rows_BX[:, None], self.n_rows),
                                                   x_BD[:, None], self.V[None], self.V.new_zeros(1, self.n_rows))
                gate_BX = gates_BK.gather(-1, pick_BK).repeat_interleave(rank, -1)
                out_BD = out_BD + kernels.decode_source(rows_BX, proj.values[:, 0] * gate_BX, self.U)
        return out_BD
