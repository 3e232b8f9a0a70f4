"""Training runs from configs: `train(cfg)` (one dictionary; a plain function that tests and sweeps
call directly) = `train_together([cfg])`, which trains one dictionary per config from one activation
stream: `setup` (the data source, data/sources.py), `init_rows`, `open_run` per dictionary
(`init_coder`, a `Trainer`, resume, logger → a `Run`, runtime/trainer.py), then `train_encoder`,
the one loop. With `data=cache` the LM is never loaded, nor even imported.
"""
from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from nn_decomp.config import UsageError, require, validate
from nn_decomp.config.arch import arch_hooks
from nn_decomp.core.coder import SparseCoder
from nn_decomp.data.sources import open_source, take_tokens
from nn_decomp.data.synthetic import task_of
from nn_decomp.runtime import distributed, tensor_parallel
from nn_decomp.runtime.checkpoint import build_coder, load_trainer_state, read_config
from nn_decomp.runtime.distributed import SINGLE, DistInfo
from nn_decomp.runtime.files import unwritable
from nn_decomp.runtime.jobs import hold_run_dir
from nn_decomp.runtime.resume import finished_run, prepare_resume, total_steps
from nn_decomp.runtime.logger import MetricsLogger
from nn_decomp.runtime.signals import stop_requests
from nn_decomp.runtime.trainer import Run, Trainer, pick_layers

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

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
            "data": OmegaConf.to_container(cfg.data, resolve=True),
            # hook templates, not layers: one stream reads every layer its runs cover (stream_config)
            "hooks": [cfg.arch.hook_in, cfg.arch.hook_out or cfg.arch.hook_in],
            "train": {k: cfg.train.get(k, 1) for k in ("batch_size", "seed", "device", "eval_tokens", "n_tokens",
                                                       "tensor_parallel")}}
    if cfg.data.source == "synthetic":  # the planted task and its layers, not hooks
        keys["task"] = [task_of(cfg.arch.name), list(cfg.arch.layers)]
    return json.dumps(keys, sort_keys=True)


def stream_config(cfgs: list[DictConfig]) -> DictConfig:
    """The config of the stream that runs of one `stream_key` share: the first run's, over every
    layer any of them covers (30 per-layer transcoders and a 30-layer CLT read one stream of 30
    layers). Not a run's config, so not validated as one: each run's is."""
    cfg = cfgs[0].copy()
    cfg.arch.layers = sorted({layer for c in cfgs for layer in c.arch.layers})
    return cfg


def stream_index(cfg: DictConfig, stream: DictConfig) -> list[int] | None:
    """Where `cfg`'s layers sit in the stream's batches [B, L, D]; None when it reads them all."""
    layers = list(stream.arch.layers)
    return None if list(cfg.arch.layers) == layers else [layers.index(layer) for layer in cfg.arch.layers]


def train_together(cfgs: list[DictConfig], run_dirs: list[Path], model: HookedTransformer | None = None,
                   info: DistInfo = SINGLE) -> list[dict | Exception]:
    """Train one dictionary per config from one activation stream (configs of equal `stream_key`):
    the LM runs once per batch, and each run gets the same init, batches, files and metrics as
    `train(cfg)` alone would give it. Returns each run's final metrics, or the exception it
    failed with (the others go on). Runs that already finished (train.resume=auto) are skipped."""
    results: list[dict | Exception | None] = [None] * len(cfgs)
    with ExitStack() as held:
        jobs = []
        for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
            run_dir = Path(run_dir)
            if info.is_main:
                make_run_dir(run_dir)
                held.enter_context(hold_run_dir(run_dir))  # one run per dir
            cfg = resolved(cfg, run_dir)
            validate(cfg)  # every run's config, before its files, the LM or the data are touched
            if (done := finished_run(cfg.train.resume, run_dir, total_steps(cfg))) is not None:
                results[i] = done  # train.resume=auto on a run that already finished (a re-run sweep)
                continue
            jobs.append((i, cfg, run_dir, prepare_resume(cfg, run_dir, info)))
        if jobs:
            train_jobs(jobs, results, model, info)
    return results


def make_run_dir(run_dir: Path) -> None:
    """Create `run_dir` or say in one line why it cannot be written (before any LM loads)."""
    if (why := unwritable(run_dir)) is not None:
        raise UsageError(f"cannot write the run dir {run_dir} ({why}): pick a writable one with hydra.run.dir=DIR "
                         "(hydra.sweep.dir=DIR for --multirun)")
    run_dir.mkdir(parents=True, exist_ok=True)


def train_jobs(jobs: list, results: list, model: HookedTransformer | None, info: DistInfo) -> None:
    """train_together's runs that train (not finished), into `results`."""
    assert len({stream_key(cfg) for _, cfg, _, _ in jobs}) == 1, "train_together: runs need one stream"
    tp = jobs[0][1].train.tensor_parallel
    require(info.world_size % tp == 0, f"train.tensor_parallel={tp} must divide the number of ranks, "
            f"{info.world_size} (torchrun --nproc-per-node, or SLURM tasks)")
    info = info._replace(tensor_parallel=tp)
    start = time.time()
    stream = stream_config([cfg for _, cfg, _, _ in jobs])
    _, store, eval_set, device = setup(stream, model, info)
    try:
        rows = init_rows(store, info)
        rng_state = torch.get_rng_state()  # each coder is initialised from the state a lone run has
        runs = [open_run(cfg, run_dir, resume, rows, store, device, info, rng_state, start, stream_index(cfg, stream))
                for _, cfg, run_dir, resume in jobs]
        train_encoder(runs, store, eval_set)
        for (i, *_), run in zip(jobs, runs):
            results[i] = run.error if run.error is not None else run.finish()
    finally:
        store.close()
    distributed.barrier(info)  # no rank returns before rank 0's files are written


def resolved(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """A fully resolved copy, so the saved config.yaml needs neither Hydra nor the environment."""
    cfg = cfg.copy()
    cfg.paths.output_dir = str(run_dir)
    OmegaConf.resolve(cfg)
    return cfg


def setup(cfg: DictConfig, model: HookedTransformer | None = None, info: DistInfo = SINGLE):
    """Everything before the first step: the LM (None without one), the training stream (this
    rank's shard), a fixed held-out eval set (rank 0 only, else None) and the device. The data
    source (data/sources.py) loads the LM unless given, and fails fast on bad hooks or layers. The caller validates `cfg` (train_together's may be a
    stream_config, over more layers than any one run covers)."""
    device = distributed.rank_device(cfg.train.device, info)
    torch.manual_seed(cfg.train.seed)
    require(cfg.train.batch_size % info.dp_size == 0,
            f"train.batch_size={cfg.train.batch_size} must be a multiple of the {info.dp_size} data-parallel ranks")
    # the ranks of one tensor-parallel group read the same rows
    source = open_source(cfg, model, device, info.data_shard(), info.is_main)
    if source.eval_set is not None:
        bad_N = ~torch.stack([torch.isfinite(rows).flatten(1).all(1) for rows in source.eval_set]).all(0)
        if bad_N.any():
            where = f"the cache {cfg.data.path}" if cfg.data.source == "cache" else "the activations"
            raise UsageError(f"{int(bad_N.sum())} of {len(bad_N)} held-out rows from {where} hold NaN / Inf: every "
                             "held-out metric would be NaN; rebuild the cache (or check the LM's weights and dtype)")
    return source.model, source.store, source.eval_set, device


INIT_BATCHES = 8
"""Batches init_coder draws for the normalisation scales and the decoder bias."""


def init_rows(store, info: DistInfo = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batches of the training stream (deterministic, so a resumed run re-draws the same
    ones), from which init_coder sets scales and the decoder bias; with several ranks the global
    batches (all_gather)."""
    x_NLD, y_NLD = take_tokens(store, INIT_BATCHES * store.batch_size)
    return global_rows(x_NLD, INIT_BATCHES, info), global_rows(y_NLD, INIT_BATCHES, info)


def global_rows(rows_NLD: torch.Tensor, n_batches: int, info: DistInfo) -> torch.Tensor:
    """Rows of n_batches local batches -> the same batches' global rows, in one-process order (each
    global batch is the ranks' local batches in rank order)."""
    parts_WNLD = distributed.all_gather_cat(rows_NLD, info)
    W, N = parts_WNLD.shape[:2]
    return parts_WNLD.view(W, n_batches, N // n_batches, *parts_WNLD.shape[2:]).transpose(0, 1).flatten(0, 2)


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


def norm_scale(acts_NLD: torch.Tensor) -> torch.Tensor:
    """[L] factor s so that E‖s·x‖² = d for each layer."""
    return (acts_NLD.shape[-1] / acts_NLD.pow(2).sum(-1).mean(0)).sqrt()


def geometric_median(points_ND: torch.Tensor, n_iter: int = 50) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to all points."""
    median_D = points_ND.mean(0)
    for _ in range(n_iter):
        weights_N = 1 / (points_ND - median_D).norm(dim=-1).clamp(min=1e-8)
        median_D = (weights_N[:, None] * points_ND).sum(0) / weights_N.sum()
    return median_D


def open_run(cfg: DictConfig, run_dir: Path, resume: bool, rows, store, device, info: DistInfo,
             rng_state: torch.Tensor, start: float, index: list[int] | None = None) -> Run:
    """A Run of `cfg`: its coder initialised from `rows` (torch's RNG at `rng_state`), resumed from
    its checkpoint when `resume`, with its metadata and (rank 0) its logger. `index`: its layers in
    the stream's batches (stream_index)."""
    torch.set_rng_state(rng_state)
    coder, scale_in, scale_out = init_coder(cfg, tuple(pick_layers(r, index) for r in rows), device, info)
    trainer = Trainer(cfg, coder, total_steps(cfg), scale_in, scale_out, info)
    eval_metrics = {}
    if resume:  # tensor parallel: the whole state stays on the CPU (mapped, not read) until sliced
        sharded = info.tensor_parallel > 1
        trainer.load_state_dict(load_trainer_state(run_dir / "checkpoint", map_location="cpu" if sharded else device,
                                                   mmap=sharded))
        eval_metrics = read_config(run_dir / "checkpoint")[1].get("eval", {})  # a finished state's, for metrics.json
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
    return Run(trainer, run_dir, metadata, logger, torch.get_rng_state(), start, index, eval_metrics)


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
    info, device = runs[0].trainer.info, runs[0].trainer.scale_in_L.device
    with stop_requests() as stop, progress:
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
            if (signum := distributed.max_over_ranks(stop.signum or 0, device, info)):
                stop.signum = signum
                for run in live:
                    run.save()
                raise stop.preempted(step)
