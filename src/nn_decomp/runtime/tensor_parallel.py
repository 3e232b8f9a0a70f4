"""Tensor (latent) parallelism, the trainer's side: sharding a dictionary and its trainer state, and
putting them back together in the one-process layout (core/shard.py: the coder's collectives).

A state-dict entry is sharded when it has a latent dim (`latent_dims`: W_enc, b_enc, W_dec, their
scales, offsets and thresholds, Adam's moments of those, the dead-latent counters); everything else
is replicated. The full coder is built once on every rank (the same seed: exactly the one-process
init) and sliced; checkpoints are gathered to rank 0 and written in the one-process layout, so
`load_dictionary` reads them and a run resumes on any number of ranks and shards.
"""
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from nn_decomp.core.coder import SparseCoder
from nn_decomp.core.shard import LatentShard
from nn_decomp.runtime.checkpoint import build_coder
from nn_decomp.runtime.distributed import DistInfo


def with_latents(cfg: DictConfig, n_latents: int) -> DictConfig:
    return OmegaConf.merge(cfg, {"arch": {"n_latents": n_latents}})


def latent_dims(cfg: DictConfig, d_in: int, d_out: int, size: int) -> dict[str, int]:
    """{state-dict name: its latent dim} for the entries a shard holds 1/size of: where a coder of
    n_latents / size latents differs in shape from the whole one (built on the meta device: no memory)."""
    with torch.device("meta"):
        whole = build_coder(cfg, d_in, d_out).state_dict()
        part = build_coder(with_latents(cfg, cfg.arch.n_latents // size), d_in, d_out).state_dict()
    return {name: next(d for d, (a, b) in enumerate(zip(t.shape, part[name].shape)) if a != b)
            for name, t in whole.items() if t.shape != part[name].shape}


def shard_of(t: Tensor, dim: int | None, info: DistInfo) -> Tensor:
    return t if dim is None else t.chunk(info.tensor_parallel, dim)[info.tp_rank].clone()


def make_shard(info: DistInfo, device) -> LatentShard:
    return LatentShard(info.tp_rank, info.tensor_parallel, info.tp_group(), info.dp_size, None, device)


def shard_coder(whole: SparseCoder, cfg: DictConfig, info: DistInfo, device) -> SparseCoder:
    """This rank's shard of `whole`, on `device`: a coder of n_latents / T latents holding its slice
    of every sharded entry, its selection and sums spanning the shards."""
    dims = latent_dims(cfg, whole.d_in, whole.d_out, info.tensor_parallel)
    with torch.device("meta"):
        coder = build_coder(with_latents(cfg, whole.n_latents // info.tensor_parallel), whole.d_in, whole.d_out)
    coder.load_state_dict({k: shard_of(v, dims.get(k), info) for k, v in whole.state_dict().items()}, assign=True)
    coder = coder.to(device)
    coder.set_shard(make_shard(info, device))
    return coder


def param_names(coder: SparseCoder, optimizer: torch.optim.Optimizer) -> list[str]:
    """The state-dict name of each parameter, in the optimizer's order (its state's integer keys)."""
    names = {id(p): n for n, p in coder.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _map_state(state: dict, names: list[str], dims: dict[str, int], fn) -> dict:
    """The trainer state with fn(tensor, latent dim) applied to every sharded tensor, in one fixed
    order (the gather is a collective: every rank must visit the same tensors)."""
    out = dict(state)
    out["coder"] = {k: fn(v, dims[k]) if k in dims else v for k, v in state["coder"].items()}
    opt = dict(state["optimizer"])
    opt["state"] = {i: {key: fn(v, dims[names[i]]) if names[i] in dims and torch.is_tensor(v) and v.dim() else v
                        for key, v in s.items()} for i, s in sorted(state["optimizer"]["state"].items())}
    out["optimizer"] = opt
    out["tokens_since_fired"] = fn(state["tokens_since_fired"], 1)
    return out


def shard_state(state: dict, names: list[str], dims: dict[str, int], info: DistInfo) -> dict:
    """This rank's part of a trainer state saved in the one-process layout."""
    return _map_state(state, names, dims, lambda t, dim: shard_of(t, dim, info))


def gather_state(state: dict, names: list[str], dims: dict[str, int], info: DistInfo) -> dict | None:
    """The one-process trainer state on rank 0, its sharded entries on the CPU (None on the other TP
    ranks of the first DP group, which must call this too)."""
    def gather(t: Tensor, dim: int) -> Tensor | None:
        parts = [torch.empty_like(t) for _ in range(info.tensor_parallel)] if info.is_main else None
        dist.gather(t.contiguous(), parts, dst=0, group=info.tp_group())
        return torch.cat(parts, dim).cpu() if info.is_main else None  # the device holds one whole entry at a time

    whole = _map_state(state, names, dims, gather)
    return whole if info.is_main else None


def clip_grad_norm_(coder: SparseCoder, dims: dict[str, int], max_norm: float, info: DistInfo) -> None:
    """torch's clip_grad_norm_ over the whole dictionary: the squared norms of the sharded gradients
    summed over the shards, the replicated ones (identical on every shard) counted once."""
    if info.tensor_parallel == 1:
        torch.nn.utils.clip_grad_norm_(coder.parameters(), max_norm)
        return
    params = {n: p for n, p in coder.named_parameters() if p.grad is not None}
    sharded_sq, replicated_sq = (
        torch.stack([torch.linalg.vector_norm(p.grad).pow(2) for n, p in params.items() if (n in dims) == sharded]).sum()
        for sharded in (True, False))
    dist.all_reduce(sharded_sq, group=info.tp_group())
    torch.nn.utils.clip_grads_with_norm_(params.values(), max_norm, (sharded_sq + replicated_sq).sqrt())
