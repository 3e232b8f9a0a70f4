"""`python -m nn_decomp.train [overrides]`: train one dictionary; `--multirun` sweeps;
`torchrun --nproc-per-node=N -m nn_decomp.train [overrides]` trains data-parallel (distributed.py).

`train(cfg)` is a plain function (tests and sweeps call it directly); `main` only adds Hydra.
Data comes from the LM (store.py) or, with `data=cache`, from an activation cache (cache.py), in
which case the LM is never loaded, nor even imported.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from nn_decomp.runtime import distributed, tensor_parallel
from nn_decomp.data.background import BackgroundStore
from nn_decomp.cache import open_cache
from nn_decomp.runtime.checkpoint import TRAINER_STATE, build_coder, save_checkpoint
from nn_decomp.runtime.files import recover_dir
from nn_decomp.config import require, validate
from nn_decomp.config.arch import CHECKPOINT_ONLY, arch_hooks
from nn_decomp.core.coder import SparseCoder
from nn_decomp.runtime.distributed import SINGLE, DistInfo
from nn_decomp.runtime.jobs import exit_on_usage_error, finished_run, is_first_rank, resolve_resume
from nn_decomp.runtime.logger import MetricsLogger
from nn_decomp.core.losses import LossOutput, coder_loss, explained_variance, fvu
from nn_decomp.data.synthetic import SyntheticData, task_of

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

INIT_BATCHES = 8
"""Batches init_coder draws for the normalisation scales and the decoder bias."""


def resolved(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """A fully resolved copy, so the saved config.yaml needs neither Hydra nor the environment."""
    cfg = cfg.copy()
    cfg.paths.output_dir = str(run_dir)
    OmegaConf.resolve(cfg)
    return cfg


def lr_lambda(step: int, warmup_steps: int, total_steps: int, decay_fraction: float, decay: str) -> float:
    """Linear warmup, constant, then decay to 0 over the last `decay_fraction` of training."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = total_steps * (1 - decay_fraction)
    if step < decay_start or decay_fraction == 0:
        return 1.0
    progress = min((step - decay_start) / (total_steps - decay_start), 1.0)
    return 1 - progress if decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


def geometric_median(points_ND: torch.Tensor, n_iter: int = 50) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to all points."""
    median_D = points_ND.mean(0)
    for _ in range(n_iter):
        weights_N = 1 / (points_ND - median_D).norm(dim=-1).clamp(min=1e-8)
        median_D = (weights_N[:, None] * points_ND).sum(0) / weights_N.sum()
    return median_D


def take_tokens(store, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole batches of `store` (at least one) adding up to at most n_tokens rows, concatenated."""
    batches = [store.next_batch() for _ in range(max(n_tokens // store.batch_size, 1))]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def global_rows(rows_NLD: torch.Tensor, n_batches: int, info: DistInfo) -> torch.Tensor:
    """Rows of n_batches local batches -> the same batches' global rows, in one-process order (each
    global batch is the ranks' local batches in rank order)."""
    parts_WNLD = distributed.all_gather_cat(rows_NLD, info)
    W, N = parts_WNLD.shape[:2]
    return parts_WNLD.view(W, n_batches, N // n_batches, *parts_WNLD.shape[2:]).transpose(0, 1).flatten(0, 2)


def norm_scale(acts_NLD: torch.Tensor) -> torch.Tensor:
    """[L] factor s so that E‖s·x‖² = d for each layer."""
    return (acts_NLD.shape[-1] / acts_NLD.pow(2).sum(-1).mean(0)).sqrt()


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
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, tc.warmup_steps, total_steps, tc.decay_fraction, tc.decay))
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
            raise FloatingPointError(
                f"loss is {losses.loss.item()} at step {self.step}; the last good checkpoint is kept. "
                "Lower train.optimizer.lr or the sparsity coefficient and resume with train.resume=true")
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
    eval_metrics: dict = field(default_factory=dict)
    error: Exception | None = None

    @property
    def last_step(self) -> int:
        total, stop = self.trainer.total_steps, self.trainer.cfg.train.max_steps
        return total if stop is None else min(stop, total)

    def step(self, x_BLD, y_BLD, eval_set) -> dict | None:
        """One optimiser step, then the log, evaluation and checkpoint due at it (rank 0). Returns
        the logged training row, if one was."""
        torch.set_rng_state(self.rng_state)
        trainer, tc = self.trainer, self.trainer.cfg.train
        losses = trainer.train_step(x_BLD, y_BLD)
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
                self.eval_metrics = evaluate_coder(whole, *eval_set, tc.batch_size) | {"dead_fraction": dead}
                self.logger.log("eval", self.eval_metrics, trainer.step)
            if save:
                meta = self.metadata | {"eval": self.eval_metrics, "tokens_seen": trainer.tokens_seen,
                                        "step": trainer.step}
                save_checkpoint(self.run_dir / "checkpoint", whole, trainer.cfg, meta, state)
        self.rng_state = torch.get_rng_state()
        return row

    def finish(self) -> dict:
        """The final metrics; rank 0 writes them to metrics.json."""
        final = self.eval_metrics | {"tokens_seen": self.trainer.tokens_seen, "steps": self.trainer.step,
                                     "wall_time_s": time.time() - self.start}
        if self.trainer.info.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(final, indent=2))
            self.logger.finish()
        return final


def train_encoder(runs: list[Run], store, eval_set) -> None:
    """The one training loop for every architecture and activation, and for several dictionaries
    on one activation stream: each batch trains every run whose next step it is (resumed runs
    wait for the stream to reach them). `store` is an ActivationsStore, a CachedActivations or a
    SyntheticData, already past its init batches. With several runs, one that raises stops alone
    (its `error` set, as a separate job would fail alone); the others go on."""
    step = min(r.trainer.step for r in runs)
    store.skip(step)  # continue the activation stream exactly where the earliest run stopped
    last = max(r.last_step for r in runs)
    main = runs[0].trainer.info.is_main
    progress = tqdm(total=last, initial=step, desc="train", mininterval=2, disable=not main)
    live = list(runs)
    while step < last and live:
        x_BLD, y_BLD = store.next_batch()
        for run in [r for r in live if r.trainer.step == step < r.last_step]:
            try:
                row = run.step(x_BLD, y_BLD, eval_set)
            except Exception as error:
                if len(runs) == 1:
                    raise
                live.remove(run)
                run.error = error
                continue
            if row is not None and len(runs) == 1:
                progress.set_postfix(loss=f"{row['loss']:.3g}", l0=f"{row['l0']:.1f}", nmse=f"{row['nmse']:.3f}")
        step += 1
        progress.update(1)
    progress.close()


def setup(cfg: DictConfig, model: HookedTransformer | None = None, info: DistInfo = SINGLE):
    """Everything before the first step: the training stream (this rank's shard), a fixed held-out
    eval set (rank 0 only, else None) and the device. From the LM (loaded unless given; fails fast
    on bad hooks or layers) or, with data=cache, from the cache (model is then None)."""
    validate(cfg)
    device = distributed.rank_device(cfg.train.device, info)
    torch.manual_seed(cfg.train.seed)
    require(cfg.train.batch_size % info.dp_size == 0,
            f"train.batch_size={cfg.train.batch_size} must be a multiple of the {info.dp_size} data-parallel ranks")
    rows = info.data_shard()  # the ranks of one tensor-parallel group read the same rows
    if cfg.data.source == "cache":
        _, store, eval_set = open_cache(cfg, device, rows)
        return None, store, eval_set if info.is_main else None, device
    if cfg.data.source == "synthetic":
        store = SyntheticData.for_run(cfg, device, rows.rank, rows.world_size)
        eval_set = store.eval_rows(cfg.train.eval_tokens)[:2] if info.is_main else None
        return None, store, eval_set, device
    from nn_decomp.data.store import lm_stores, lm_train_store  # transformer_lens, datasets: ~10 s, cache runs skip it

    lm = lm_stores(cfg, model, device, cfg.train.batch_size // rows.world_size, rows)
    eval_set = take_tokens(lm.eval, cfg.train.eval_tokens) if info.is_main else None
    if not cfg.data.background:
        return lm.model, lm.train, eval_set, device
    # a CUDA LM cannot be forked: a spawned process loads its own copy and builds the same store
    lm_on_gpu = next(lm.model.parameters()).device.type == "cuda"
    batch_size = cfg.train.batch_size // rows.world_size
    recipe = functools.partial(lm_train_store, cfg, batch_size, rows, device) if lm_on_gpu else None
    store = BackgroundStore(lm.train, cfg.data.background_slots, cfg.data.background_threads, recipe)
    return lm.model, store, eval_set, device


def init_rows(store, info: DistInfo = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batches of the training stream (deterministic, so a resumed run re-draws the same
    ones), from which init_coder sets scales and the decoder bias; with several ranks the global
    batches (all_gather)."""
    x_NLD, y_NLD = take_tokens(store, INIT_BATCHES * store.batch_size)
    return global_rows(x_NLD, INIT_BATCHES, info), global_rows(y_NLD, INIT_BATCHES, info)


def init_coder(cfg: DictConfig, rows: tuple[torch.Tensor, torch.Tensor], device,
               info: DistInfo = SINGLE) -> tuple[SparseCoder, torch.Tensor, torch.Tensor]:
    """Build the coder, then set normalisation scales and the decoder bias from `rows`
    (`init_rows`); with several ranks rank 0's coder is broadcast to all. Tensor parallel: the whole
    coder is built on the CPU alike on every rank (the same seed and rows) and only this rank's shard
    goes to the device; data parallel alone: a shard of one, whose BatchTopK selects over the global batch."""
    x_NLD, y_NLD = rows
    d_in, d_out = x_NLD.shape[-1], y_NLD.shape[-1]
    sharded = info.tensor_parallel > 1
    coder = build_coder(cfg, d_in, d_out)
    coder = coder if sharded else coder.to(device)
    ones = torch.ones(x_NLD.shape[1], device=device)
    # a token-normalising coder scales each input itself: an input scale would only be folded wrongly
    scale_in = norm_scale(x_NLD) if cfg.train.normalize_activations and not coder.activation.token_norm else ones
    if (s_NL1 := coder.token_scale(x_NLD)) is not None:  # targets as train_step scales them
        y_NLD = y_NLD * s_NL1
    scale_out = norm_scale(y_NLD) if cfg.train.normalize_activations else ones.clone()
    y_NLD = y_NLD * scale_out[:, None]
    with torch.no_grad():
        if cfg.train.b_dec_init == "mean":
            coder.b_dec.copy_(y_NLD.mean(0))
        elif cfg.train.b_dec_init == "geometric_median":
            coder.b_dec.copy_(torch.stack([geometric_median(y_NLD[:, i]) for i in range(y_NLD.shape[1])]))
    if sharded:
        distributed.broadcast_([scale_in, scale_out], info)
        return tensor_parallel.shard_coder(coder, cfg, info, device), scale_in, scale_out
    distributed.broadcast_([*coder.parameters(), *coder.buffers(), scale_in, scale_out], info)
    if info.active:
        coder.set_shard(tensor_parallel.make_shard(info, device))
    return coder, scale_in, scale_out


def train(cfg: DictConfig, run_dir: str | Path | None = None, model: HookedTransformer | None = None) -> dict:
    """Train one dictionary as `cfg` says; returns the final eval metrics. Writes checkpoint/,
    metrics.json and metrics.jsonl into `run_dir` (default: the Hydra run dir). `model` replaces
    the LM that `cfg.model` names (tests pass a tiny one; unused with data=cache).

    Under torchrun (or SLURM with several tasks) every rank runs this: they join one process group,
    use rank 0's run dir, and train on their own shards; rank 0 alone logs and writes files."""
    info = distributed.init(distributed.rank_device(cfg.train.device, SINGLE).type)
    run_dir = Path(distributed.broadcast_object(str(run_dir or cfg.paths.output_dir), info))
    final = train_together([cfg], [run_dir], model, info)[0]
    if isinstance(final, Exception):
        raise final
    return final


def stream_key(cfg: DictConfig) -> str:
    """What decides a run's activation batches: runs with equal keys can share one stream
    (`train_together`) and get the batches each would get alone."""
    keys = {"model": OmegaConf.to_container(cfg.model, resolve=True),
            "data": OmegaConf.to_container(cfg.data, resolve=True), "hooks": arch_hooks(cfg.arch),
            "train": {k: cfg.train.get(k, 1) for k in ("batch_size", "seed", "device", "eval_tokens", "n_tokens",
                                                       "tensor_parallel")}}
    if cfg.data.source == "synthetic":  # the planted task and its layers, not hooks
        keys["task"] = [task_of(cfg.arch.name), len(cfg.arch.layers)]
    return json.dumps(keys, sort_keys=True)


def train_together(cfgs: list[DictConfig], run_dirs: list[Path], model: HookedTransformer | None = None,
                   info: DistInfo = SINGLE) -> list[dict | Exception]:
    """Train one dictionary per config from one activation stream (configs of equal `stream_key`):
    the LM runs once per batch, and each run gets the same init, batches, files and metrics as
    `train(cfg)` alone would give it. Returns each run's final metrics, or the exception it
    failed with (the others go on). Runs that already finished (train.resume=auto) are skipped."""
    results: list[dict | Exception | None] = [None] * len(cfgs)
    jobs = []
    for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = resolved(cfg, run_dir)
        if (done := finished_run(cfg.train.resume, run_dir)) is not None:
            results[i] = done  # train.resume=auto on a run that already finished (a re-run sweep)
            continue
        if info.is_main:  # a crash while the last checkpoint was being swapped in
            recover_dir(run_dir / "checkpoint")
        distributed.barrier(info)
        jobs.append((i, cfg, run_dir, resolve_resume(cfg.train.resume, run_dir / "checkpoint" / TRAINER_STATE)))
    if not jobs:
        return results
    assert len({stream_key(cfg) for _, cfg, _, _ in jobs}) == 1, "train_together: runs need one stream"
    for _, cfg, _, _ in jobs:
        validate(cfg)  # every run's config, before the LM or the data is touched
    tp = jobs[0][1].train.tensor_parallel
    require(info.world_size % tp == 0, f"train.tensor_parallel={tp} must divide the number of ranks, "
            f"{info.world_size} (torchrun --nproc-per-node, or SLURM tasks)")
    info = info._replace(tensor_parallel=tp)
    start = time.time()
    _, store, eval_set, device = setup(jobs[0][1], model, info)
    try:
        rows = init_rows(store, info)
        rng_state = torch.get_rng_state()  # each coder is initialised from the state a lone run has
        runs = [open_run(cfg, run_dir, resume, rows, store, device, info, rng_state, start)
                for _, cfg, run_dir, resume in jobs]
        train_encoder(runs, store, eval_set)
        for (i, *_), run in zip(jobs, runs):
            results[i] = run.error if run.error is not None else run.finish()
    finally:
        store.close()
    distributed.barrier(info)  # no rank returns before rank 0's files are written
    return results


def open_run(cfg: DictConfig, run_dir: Path, resume: bool, rows, store, device, info: DistInfo,
             rng_state: torch.Tensor, start: float) -> Run:
    """A Run of `cfg`: its coder initialised from `rows` (torch's RNG at `rng_state`), resumed from
    its checkpoint when `resume`, with its metadata and (rank 0) its logger."""
    torch.set_rng_state(rng_state)
    coder, scale_in, scale_out = init_coder(cfg, rows, device, info)
    trainer = Trainer(cfg, coder, cfg.train.n_tokens // cfg.train.batch_size, scale_in, scale_out, info)
    if resume:  # tensor parallel: the whole state stays on the CPU (mapped, not read) until sliced
        sharded = info.tensor_parallel > 1
        trainer.load_state_dict(torch.load(run_dir / "checkpoint" / TRAINER_STATE, weights_only=False,
                                           map_location="cpu" if sharded else device, mmap=sharded))
    hooks_in, hooks_out = arch_hooks(cfg.arch)
    model_name = "synthetic" if cfg.data.source == "synthetic" else cfg.model.name
    metadata = {"model": model_name, "arch": cfg.arch.name, "act": type(coder.activation).__name__.lower(),
                "layers": list(cfg.arch.layers), "hooks_in": hooks_in, "hooks_out": hooks_out,
                "d_in": coder.d_in, "d_out": coder.d_out, "n_latents": cfg.arch.n_latents,
                "world_size": info.world_size, "tensor_parallel": info.tensor_parallel}
    if cfg.data.source == "cache":  # where the activations came from: the cache's text
        metadata["cache"] = {"path": str(store.meta.path), "text_source": store.meta.text_source,
                             "n_tokens": store.meta.n_tokens, "dtype": store.meta.dtype}
    logger = MetricsLogger(cfg, run_dir) if info.is_main else None
    return Run(trainer, run_dir, metadata, logger, torch.get_rng_state(), start)


def run_summary(run_dir: Path, final: dict, arch: str) -> str:
    """What a finished run printed last: where it is, how good it is, and what to run next (export:
    not for a crosscoder or MOLT, which no other format holds)."""
    ckpt = run_dir / "checkpoint"
    minutes, seconds = divmod(round(final.get("wall_time_s", 0)), 60)
    export = [] if arch in CHECKPOINT_ONLY else [
        f"export      python -m nn_decomp.export checkpoint={ckpt} format=saelens|circuit_tracer out=DIR"]
    return "\n".join([
        f"run dir     {run_dir}",
        f"checkpoint  {ckpt}",
        f"held-out    FVU {final.get('nmse', float('nan')):.4f}  EV {final.get('explained_variance', float('nan')):.4f}  "
        f"L0 {final.get('l0', float('nan')):.1f}  dead {final.get('dead_fraction_eval', float('nan')):.1%}  "
        f"({final.get('tokens_seen', 0):,} tokens, {minutes}m{seconds:02d}s)",
        f"evaluate    python -m nn_decomp.evaluate checkpoint={ckpt}", *export])


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    final = exit_on_usage_error(train, cfg)
    if is_first_rank():
        print(run_summary(Path(cfg.paths.output_dir), final, cfg.arch.name), flush=True)


if __name__ == "__main__":
    main()
