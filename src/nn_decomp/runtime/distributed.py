"""Data-parallel training: `torchrun --nproc-per-node=N -m nn_decomp.train ...`.

The process group is set up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT: init_method env://), or, under SLURM without torchrun (Hydra's submitit
launcher with tasks_per_node=N), from SLURM's through submitit's `TorchDistributedEnvironment`.
A run with neither is a plain single process and never touches torch.distributed.

What is global and what is per rank:
- every rank holds the same coder and optimizer; after each backward the gradients, the coder's
  float buffers (BatchTopK's threshold estimate), the set of latents that fired and the logged loss
  terms are averaged in one all_reduce, so every rank takes the same step;
- the loss is computed on the rank's own rows (train.batch_size / N of them). For losses that are
  means over tokens given the dead-latent mask (ReLU, TopK with AuxK, JumpReLU) the averaged
  gradient is the gradient of the one-process loss on the global batch. BatchTopK selects its
  k·B largest activations over the global batch (core/shard.py gathers each rank's candidates);
- FVU and L0 in the training log are averages of per-rank values; evaluation, logging and
  checkpoints are rank 0's alone.

With `train.tensor_parallel=T` the W ranks form a T × (W / T) mesh: rank r holds latent shard r mod T
of the dictionary (its TP group: the T ranks r − r mod T …, which see the same rows) and is data-parallel
rank r // T (its DP group: the ranks of its shard, which average gradients as above).
"""
import atexit
import os
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor


class DistInfo(NamedTuple):
    """This process's place in the job: rank in [0, world_size), GPU index on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tensor_parallel: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tensor_parallel

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tensor_parallel

    def data_shard(self) -> "DistInfo":
        """Where this rank's rows come from: its data-parallel rank among dp_size (TP ranks share rows)."""
        return DistInfo(self.dp_rank, self.dp_size, self.local_rank)

    def tp_group(self):
        return _mesh_groups(self)[0]

    def dp_group(self):
        """The ranks holding this rank's latents (None, the default group, without tensor parallelism)."""
        return _mesh_groups(self)[1]


SINGLE = DistInfo()


_GROUPS: dict[int, tuple] = {}


def _mesh_groups(info: DistInfo) -> tuple:
    """(TP group, DP group) of this rank, created once per tensor_parallel size (every rank creates
    every group, in one order, as torch.distributed requires)."""
    T, W = info.tensor_parallel, info.world_size
    if T == 1:
        return None, None
    if T not in _GROUPS:
        tp, _ = dist.new_subgroups_by_enumeration([list(range(d * T, (d + 1) * T)) for d in range(W // T)])
        dp, _ = dist.new_subgroups_by_enumeration([list(range(t, W, T)) for t in range(T)])
        _GROUPS[T] = tp, dp
    return _GROUPS[T]


def _export_slurm_env() -> None:
    """SLURM tasks of one job (tasks_per_node × nodes > 1) but no torchrun: derive its env vars."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        from submitit.helpers import TorchDistributedEnvironment  # only SLURM jobs need it

        # Keep every GPU visible: rank_device picks the local rank's one.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init(device_type: str) -> DistInfo:
    """Join the job's process group (once per process; nccl for CUDA, gloo for CPU), or return
    SINGLE when this is the only process."""
    _export_slurm_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return SINGLE
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(rank_device("cuda", info))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method="env://")
        atexit.register(dist.destroy_process_group)
    return info


def rank_device(spec: str, info: DistInfo) -> torch.device:
    """`auto` picks CUDA when there is one; with several ranks each takes the GPU of its local rank
    (modulo the GPUs it can see: SLURM may show each task only its own)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and info.active:
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return device


def all_reduce_mean(tensors: list[Tensor], info: DistInfo) -> list[Tensor]:
    """Average each tensor over the data-parallel ranks, all in one collective (flattened into one
    float32 buffer)."""
    if info.dp_size == 1:
        return tensors
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, group=info.dp_group())
    flat /= info.dp_size
    return [part.view_as(t).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def all_gather_cat(tensor: Tensor, info: DistInfo) -> Tensor:
    """[W, *shape]: every data-parallel rank's tensor, in rank order."""
    if info.dp_size == 1:
        return tensor[None]
    parts = [torch.empty_like(tensor) for _ in range(info.dp_size)]
    dist.all_gather(parts, tensor.contiguous(), group=info.dp_group())
    return torch.stack(parts)


def broadcast_(tensors: list[Tensor], info: DistInfo) -> None:
    """Overwrite each tensor in place with rank 0's."""
    if info.active:
        for t in tensors:
            dist.broadcast(t.data, src=0)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of a picklable object, on every rank."""
    if not info.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def max_over_ranks(value: int, device: torch.device, info: DistInfo) -> int:
    """The largest of every rank's `value` (a stop signal seen by any rank stops them all at one step)."""
    if not info.active:
        return value
    box = torch.tensor([value], device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())
