"""Tensor (latent) parallelism, the coder's side: which collectives a sharded dictionary needs.

Under `train.tensor_parallel=N` each of N ranks holds F/N latents of every source layer (their encoder
rows, biases, thresholds and decoder vectors); b_dec and W_skip are replicated. The collectives are
explicit rather than DTensor's: selection needs an exact top-k across shards, which no DTensor op
gives, and here each one is a line whose cost can be read off.

- Selection. A rank's own top k of a row (top k·B of the batch) holds every entry of its part of the
  global selection, so an all_gather of those values and the k-th largest over them is the global
  cutoff; each rank keeps its entries at or above it. TopK and AuxK gather over the TP group (a token
  row lives on one data-parallel rank); BatchTopK over every rank, so that its selection is over the
  global batch under data parallelism too.
- Sums over latents (the reconstruction, L1-type penalties, L0) are all-reduced by `sum`, whose
  backward is the identity: the loss is the same function of the sum on every rank, so the gradient
  of a rank's part is the gradient of the sum.
A coder that is not sharded holds `NO_SHARD`, whose every method returns its input.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def _all_reduced(t: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    """A reduced copy of t (t itself is left as it is)."""
    t = t.clone()
    dist.all_reduce(t, op=op, group=group)
    return t


class _SumOverShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        return _all_reduced(t, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class LatentShard:
    """This rank's share of the latents: the `rank`-th of `size` equal slices, `group` the ranks
    holding the other slices of the same rows; `batch_ranks` data-parallel ranks hold the global
    batch's rows, and `batch_group` is every rank (None: the default group)."""

    def __init__(self, rank: int = 0, size: int = 1, group=None, batch_ranks: int = 1, batch_group=None,
                 device: torch.device | str = "cpu"):
        self.rank, self.size, self.group = rank, size, group
        self.batch_ranks, self.batch_group, self.device = batch_ranks, batch_group, device

    def __deepcopy__(self, memo):  # process groups are shared, never copied
        return self

    def sum(self, t: Tensor) -> Tensor:
        """Σ over the shards of t, differentiable (identity backward)."""
        return _SumOverShards.apply(t, self.group) if self.size > 1 else t

    def batch_mean(self, t: Tensor) -> Tensor:
        """The mean over the global batch of a per-rank batch mean t (the same on a TP group's ranks),
        differentiable with the identity backward: with the gradients averaged over data-parallel ranks
        afterwards, a loss nonlinear in it gets its one-process gradient."""
        if self.batch_ranks == 1:
            return t
        mean = _all_reduced(t, self.batch_group) / self.n_batch_ranks
        return t + (mean - t).detach()

    def total(self, t: Tensor) -> Tensor:
        """Σ over the shards of a statistic (no gradient)."""
        return _all_reduced(t, self.group) if self.size > 1 else t

    @torch.no_grad()
    def _gather(self, t: Tensor, group, n: int) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, -1)

    def top_per_row(self, values_BLK: Tensor, k: int) -> Tensor:
        """`values_BLK` (≥ 0, this shard's own top k per row) with every entry below its row's global
        k-th largest zeroed."""
        if self.size == 1:
            return values_BLK
        everyone = self._gather(values_BLK.detach().float(), self.group, self.size)
        cutoff_BL1 = everyone.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
        return torch.where(values_BLK >= cutoff_BL1, values_BLK, 0)

    @property
    def n_batch_ranks(self) -> int:
        return self.size * self.batch_ranks

    def kth_largest(self, flat_GN: Tensor, n: int) -> Tensor:
        """[G] the n-th largest entry of each group over the whole global batch and every shard."""
        local = flat_GN.topk(min(n, flat_GN.shape[-1]), dim=-1, sorted=False).values
        if self.n_batch_ranks > 1:  # every rank sends n values (its candidates' count varies): −inf pads
            local = F.pad(local.float(), (0, n - local.shape[-1]), value=-torch.inf)
            local = self._gather(local, self.batch_group, self.n_batch_ranks)
        return local.topk(n, dim=-1, sorted=False).values.amin(-1)

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is on any."""
        if self.n_batch_ranks == 1:
            return flag
        t = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.batch_group)
        return bool(t)

    def amin(self, t: Tensor) -> Tensor:
        """Elementwise minimum over every rank (no gradient)."""
        return _all_reduced(t, self.batch_group, dist.ReduceOp.MIN) if self.n_batch_ranks > 1 else t


NO_SHARD = LatentShard()
