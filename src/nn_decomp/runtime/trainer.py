"""One dictionary in training: `Trainer` (the optimiser step and everything resume needs), `Run`
(its files, RNG state and the log / evaluation / checkpoint due at each step) and `evaluate_coder`
(held-out reconstruction and sparsity). `runtime/training.py` sets runs up and drives them."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from nn_decomp.config import UsageError
from nn_decomp.core.coder import SparseCoder
from nn_decomp.core.losses import LossOutput, coder_loss, explained_variance, fvu
from nn_decomp.runtime import distributed, tensor_parallel
from nn_decomp.runtime.checkpoint import build_coder, save_checkpoint
from nn_decomp.runtime.distributed import SINGLE, DistInfo
from nn_decomp.runtime.logger import MetricsLogger


class NonFiniteLoss(UsageError, FloatingPointError):
    """The loss became NaN / Inf; the message names the likely cause."""


def lr_lambda(step: int, warmup_steps: int, total_steps: int, decay_fraction: float, decay: str) -> float:
    """Linear warmup, constant, then decay to 0 over the last `decay_fraction` of training."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = total_steps * (1 - decay_fraction)
    if step < decay_start or decay_fraction == 0:
        return 1.0
    progress = min((step - decay_start) / (total_steps - decay_start), 1.0)
    return 1 - progress if decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


def lr_scheduler(optimizer: torch.optim.Optimizer, tc: DictConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """train.warmup_steps / decay_fraction / decay as a scheduler over `total_steps` (ours and the peers')."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, tc.warmup_steps, total_steps, tc.decay_fraction, tc.decay))


@torch.no_grad()
def evaluate_coder(coder: SparseCoder, x_NLD, y_NLD, batch_size: int) -> dict:
    """Reconstruction and sparsity on a fixed held-out set (eval mode: BatchTopK uses its threshold)."""
    was_training = coder.training
    coder.eval()
    outs = [coder(x) for x in x_NLD.split(batch_size)]
    coder.train(was_training)
    recon = torch.cat([o.recon for o in outs])
    l0_L = torch.stack([o.latents.l0() for o in outs]).mean(0)
    fired_LF = torch.stack([o.latents.fired() for o in outs]).any(0)
    fvu_L, ev_L = fvu(recon, y_NLD), explained_variance(recon, y_NLD)
    metrics = {"nmse": fvu_L.mean().item(), "explained_variance": ev_L.mean().item(),
               "mse": (y_NLD - recon).pow(2).mean().item(), "l0": l0_L.sum().item(),
               "dead_fraction_eval": 1 - fired_LF.float().mean().item()}
    if coder.n_layers > 1:
        metrics |= {f"nmse/layer{i}": v.item() for i, v in enumerate(fvu_L)}
    if coder.n_sources > 1:
        metrics |= {f"l0/layer{i}": v.item() for i, v in enumerate(l0_L)}
    return metrics


def param_groups(coder: SparseCoder) -> list[dict]:
    """JumpReLU's log θ gets its own learning rate (act.threshold_lr_scale × lr); all else lr."""
    threshold = getattr(coder.activation, "log_threshold", None)
    others = [p for p in coder.parameters() if p is not threshold]
    groups = [{"params": others, "lr_scale": 1.0}]
    if threshold is not None:
        groups.append({"params": [threshold], "lr_scale": coder.activation.threshold_lr_scale})
    return groups


class Trainer:
    """State of one training run; `train_encoder` drives it. Everything resume needs is in
    `state_dict`."""

    def __init__(self, cfg: DictConfig, coder: SparseCoder, total_steps: int, scale_in_L, scale_out_L,
                 info: DistInfo = SINGLE):
        tc = cfg.train
        self.cfg, self.coder, self.total_steps, self.info = cfg, coder, total_steps, info
        # tensor parallel: which state entries this rank holds a slice of (runtime/tensor_parallel.py)
        self.latent_dims = tensor_parallel.latent_dims(cfg, coder.d_in, coder.d_out, info.tensor_parallel) \
            if info.tensor_parallel > 1 else {}
        self.scale_in_L, self.scale_out_L = scale_in_L, scale_out_L
        self.optimizer = instantiate(tc.optimizer)(param_groups(coder))
        for group in self.optimizer.param_groups:  # before LambdaLR records each group's base lr
            group["lr"] *= group.pop("lr_scale")
        self.scheduler = lr_scheduler(self.optimizer, tc, total_steps)
        self.step, self.tokens_seen = 0, 0
        self.compute_dtype = getattr(torch, tc.dtype)
        # float16's narrow range needs a scaled loss; bfloat16 has float32's range and needs none
        self.scaler = torch.amp.GradScaler(scale_in_L.device.type, enabled=tc.dtype == "float16")
        self.tokens_since_fired_LF = torch.zeros(coder.n_sources, coder.n_latents, dtype=torch.long,
                                                 device=scale_in_L.device)

    def dead_LF(self) -> torch.Tensor:
        return self.tokens_since_fired_LF >= self.cfg.train.dead_tokens

    def sparsity_weight(self) -> float:
        """The sparsity penalty's weight rises linearly from 0 to 1 over train.sparsity_warmup_steps."""
        return min(1.0, (self.step + 1) / (self.cfg.train.sparsity_warmup_steps + 1))

    def dead_fraction(self) -> float:
        """Over the whole dictionary (tensor parallel: a collective of the TP group)."""
        return (self.coder.shard.total(self.dead_LF().sum()) / (self.coder.n_sources * self.cfg.arch.n_latents)).item()

    def train_step(self, x_BLD, y_BLD):
        """One optimiser step on this rank's rows; with several ranks, on their average gradient."""
        coder, act = self.coder, self.coder.activation
        x_BLD, y_BLD = x_BLD * self.scale_in_L[:, None], y_BLD * self.scale_out_L[:, None]
        if (s_BL1 := coder.token_scale(x_BLD)) is not None:  # the loss is taken where the activation selects
            x_BLD, y_BLD = x_BLD * s_BL1, y_BLD * s_BL1
        # float32: no autocast context at all, so one a caller holds around the step still applies
        low = self.compute_dtype != torch.float32
        with torch.autocast(x_BLD.device.type, self.compute_dtype) if low else contextlib.nullcontext():
            out = coder(x_BLD)
            losses = coder_loss(coder, out, y_BLD, self.dead_LF(), self.sparsity_weight(), self.step / self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses.loss).backward()
        # After the average, so that every rank sees the same loss and stops at the same step.
        losses, fired_LF = self.average_over_ranks(losses, out.latents.fired())
        if not torch.isfinite(losses.loss):
            raise NonFiniteLoss(self.non_finite_cause(losses.loss.item(), x_BLD, y_BLD))
        self.scaler.unscale_(self.optimizer)  # the true gradients, for the projection and the clip
        if act.unit_norm_decoder:
            coder.remove_parallel_decoder_grad()
        tensor_parallel.clip_grad_norm_(coder, self.latent_dims, self.cfg.train.grad_clip, self.info)
        self.scaler.step(self.optimizer)  # float16: skipped (and the scale lowered) on inf/nan gradients
        self.scaler.update()
        self.scheduler.step()
        if act.unit_norm_decoder:
            coder.set_decoder_norm(1.0)
        n_tokens = x_BLD.shape[0] * self.info.dp_size
        self.tokens_since_fired_LF += n_tokens
        self.tokens_since_fired_LF[fired_LF] = 0
        self.step += 1
        self.tokens_seen += n_tokens
        return losses

    def non_finite_cause(self, loss: float, x_BLD, y_BLD) -> str:
        """Why the loss is not finite: bad input rows (the batch is checked only now, at no cost to
        healthy steps), or else the optimisation itself."""
        bad_B = ~(torch.isfinite(x_BLD).flatten(1).all(1) & torch.isfinite(y_BLD).flatten(1).all(1))
        where = f"loss is {loss} at step {self.step}; the last good checkpoint is kept"
        if bad_B.any():
            return (f"{where}. {int(bad_B.sum())} of {len(bad_B)} activation rows of this batch hold NaN / Inf: the "
                    "data is bad, not the learning rate (a cache: rebuild it; the LM: check its weights and dtype)")
        return f"{where}. Lower train.optimizer.lr or the sparsity coefficient and resume with train.resume=true"

    def average_over_ranks(self, losses: LossOutput, fired_LF: torch.Tensor) -> tuple[LossOutput, torch.Tensor]:
        """Average gradients, float buffers (BatchTopK's threshold) and loss terms over ranks, and
        OR the fired latents, in one all_reduce over the data-parallel ranks. A parameter without a
        gradient counts as zeros."""
        if self.info.dp_size == 1:
            return losses, fired_LF
        params = list(self.coder.parameters())
        buffers = [b for b in self.coder.buffers() if b.is_floating_point()]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        averaged = distributed.all_reduce_mean([*grads, *buffers, fired_LF.float(), *losses], self.info)
        for p, g in zip(params, averaged):
            p.grad = g
        for b, avg in zip(buffers, averaged[len(params):]):
            b.copy_(avg)
        fired_avg, *loss_avg = averaged[len(params) + len(buffers):]
        return LossOutput(*loss_avg), fired_avg > 0

    def state_dict(self) -> dict:
        return {"coder": self.coder.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "tokens_seen": self.tokens_seen,
                "tokens_since_fired": self.tokens_since_fired_LF, "scale_in": self.scale_in_L,
                "scale_out": self.scale_out_L, "torch_rng": torch.get_rng_state(),
                # BatchTopK's search width changes no selection, but it orders the selected entries and
                # so the decoder's float sums: kept, a resumed run stays bitwise equal to an unbroken one
                "n_candidates": getattr(self.coder.activation, "n_candidates", None),
                "grad_scaler": self.scaler.state_dict()}

    def full_state_dict(self) -> dict | None:
        """The state in the one-process layout on rank 0, None on other ranks; tensor parallel: gathered
        from the first data-parallel group's shards, each of which must call this."""
        if self.info.tensor_parallel == 1 or self.info.dp_rank > 0:
            return self.state_dict() if self.info.is_main else None
        names = tensor_parallel.param_names(self.coder, self.optimizer)
        return tensor_parallel.gather_state(self.state_dict(), names, self.latent_dims, self.info)

    def load_state_dict(self, state: dict) -> None:
        """A state of `state_dict` or `full_state_dict` (tensor parallel: this rank's slice is taken)."""
        if self.latent_dims:
            names = tensor_parallel.param_names(self.coder, self.optimizer)
            state = tensor_parallel.shard_state(state, names, self.latent_dims, self.info)
        self.coder.load_state_dict(state["coder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.tokens_since_fired_LF.copy_(state["tokens_since_fired"])
        self.scale_in_L.copy_(state["scale_in"])
        self.scale_out_L.copy_(state["scale_out"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        if state.get("n_candidates") is not None:
            self.coder.activation.n_candidates = state["n_candidates"]


def snapshot(trainer: Trainer) -> tuple[SparseCoder, dict] | None:
    """On rank 0, (the coder as saved: whole, a copy with the normalisation folded into its weights;
    the trainer state in the one-process layout); None on other ranks. Tensor parallel: a collective
    of the first data-parallel group."""
    state = trainer.full_state_dict()
    if state is None:
        return None
    if trainer.info.tensor_parallel == 1:
        whole = copy.deepcopy(trainer.coder)
    else:
        with torch.device("meta"):  # no init to compute, and no draw from torch's RNG
            whole = build_coder(trainer.cfg, trainer.coder.d_in, trainer.coder.d_out)
        # evaluated on rank 0's device: the whole dictionary must fit there (the training state need not)
        device = trainer.scale_in_L.device
        whole.load_state_dict({k: v.to(device, copy=True) for k, v in state["coder"].items()}, assign=True)
    whole.fold_scales(trainer.scale_in_L, trainer.scale_out_L)
    return whole, state


def pick_layers(rows_NLD: torch.Tensor, index: list[int] | None) -> torch.Tensor:
    """The layers `index` of a shared stream's rows (all of them for None)."""
    return rows_NLD if index is None else rows_NLD[:, index]


@dataclass
class Run:
    """One dictionary in training: its Trainer, where its files go (rank 0: a logger; other ranks
    None) and its own torch RNG state, so dictionaries sharing a stream draw as separate jobs would."""

    trainer: Trainer
    run_dir: Path
    metadata: dict
    logger: MetricsLogger | None
    rng_state: torch.Tensor
    start: float
    index: list[int] | None = None
    """Its layers in the shared stream's batches (None: all of them)."""
    eval_metrics: dict = field(default_factory=dict)
    error: Exception | None = None
    saved_step: int | None = None

    @property
    def last_step(self) -> int:
        total, stop = self.trainer.total_steps, self.trainer.cfg.train.max_steps
        return total if stop is None else min(stop, total)

    def step(self, x_BLD, y_BLD, eval_set) -> dict | None:
        """One optimiser step, then the log, evaluation and checkpoint due at it (rank 0). Returns
        the logged training row, if one was."""
        torch.set_rng_state(self.rng_state)
        trainer, tc = self.trainer, self.trainer.cfg.train
        losses = trainer.train_step(pick_layers(x_BLD, self.index), pick_layers(y_BLD, self.index))
        row, done = None, trainer.step == self.last_step
        # every rank reaches the same decisions: with tensor parallelism each below is a collective
        log, evaluate, save = (trainer.step % every == 0 or done
                               for every in (tc.log_every, tc.eval_every, tc.checkpoint_every))
        dead = trainer.dead_fraction() if log or evaluate else None
        if log and trainer.info.is_main:
            row = {"loss": losses.loss.item(), "recon": losses.recon.item(), "sparsity": losses.sparsity.item(),
                   "aux": losses.aux.item(), "nmse": losses.fvu_L.mean().item(), "l0": losses.l0_L.sum().item(),
                   "dead_fraction": dead, "lr": trainer.scheduler.get_last_lr()[0], "tokens": trainer.tokens_seen}
            self.logger.log("train", row, trainer.step)
        if (evaluate or save) and (saved := snapshot(trainer)) is not None:
            whole, state = saved
            if evaluate:  # the folded coder on raw activations: exactly what a user of the checkpoint gets
                x_eval, y_eval = (pick_layers(rows, self.index) for rows in eval_set)
                self.eval_metrics = evaluate_coder(whole, x_eval, y_eval, tc.batch_size) | {"dead_fraction": dead}
                self.logger.log("eval", self.eval_metrics, trainer.step)
            if save:
                self.write_checkpoint(whole, state)
        if save:
            self.saved_step = trainer.step
        self.rng_state = torch.get_rng_state()
        return row

    def write_checkpoint(self, whole: SparseCoder, state: dict) -> None:
        trainer = self.trainer
        meta = self.metadata | {"eval": self.eval_metrics, "tokens_seen": trainer.tokens_seen, "step": trainer.step}
        save_checkpoint(self.run_dir / "checkpoint", whole, trainer.cfg, meta, state, trainer.cfg.train.keep_last)

    def save(self) -> None:
        """A checkpoint at this step unless one was written at it: a preempted run's last act (with
        tensor parallelism a collective)."""
        if self.saved_step == self.trainer.step:
            return
        self.saved_step = self.trainer.step
        torch.set_rng_state(self.rng_state)  # the state this run's next step starts from, as step() saves it
        if (saved := snapshot(self.trainer)) is not None:
            self.write_checkpoint(*saved)

    def finish(self) -> dict:
        """The final metrics; rank 0 writes them to metrics.json."""
        final = self.eval_metrics | {"tokens_seen": self.trainer.tokens_seen, "steps": self.trainer.step,
                                     "wall_time_s": time.time() - self.start}
        if self.trainer.info.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(final, indent=2))
            self.logger.finish()
        return final
