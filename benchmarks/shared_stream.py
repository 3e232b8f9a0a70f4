"""N dictionaries from one LM pass (`hydra/launcher=shared_stream`) vs N separate jobs.

    python benchmarks/shared_stream.py                  # SmolLM2 transcoders at layers 2 and 20, k = 8,16,32,64
    python benchmarks/shared_stream.py --quick          # small numbers, a smoke run

The same 4-job sweep `act.k=8,16,32,64`, typed as a user would (one subprocess each, start-up included):
- separate: `python -m nn_decomp.train --multirun …` (Hydra's basic launcher: one job after another,
  each loading the LM, computing its eval set and generating its own training rows);
- shared:   the same command with `hydra/launcher=shared_stream` (one LM pass per batch for all four).
Throughput is dictionary-tokens per second: N·n_tokens / wall time; the ratio shared / separate is the
speed-up (target ≥ 0.8·N). Each job trains the same dictionary both ways (the test suite checks the
weights are bitwise equal). Both run with the same thread count (`--threads`, default 1). Where the
LM pass dominates (a deep layer) sharing it pays most; at a shallow layer the LM is cheap and the N
training steps, which are not shared, dominate.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KS = [8, 16, 32, 64]


def sweep(layer: int, n_tokens: int, n_latents: int, launcher: str, out: Path, threads: int) -> float:
    cmd = [sys.executable, "-m", "nn_decomp.train", "--multirun", f"hydra/launcher={launcher}", "arch=transcoder",
           f"arch.layers=[{layer}]", f"arch.n_latents={n_latents}", "act=topk", f"act.k={','.join(map(str, KS))}",
           f"train.n_tokens={n_tokens}", "train.batch_size=1024", "train.eval_every=1000000",
           "train.checkpoint_every=1000000", f"hydra.sweep.dir={out}"]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 20])
    args = parser.parse_args()
    n_tokens, n_latents = (2048, 256) if args.quick else (16384, 4096)
    n = len(KS)
    print(f"{n} SmolLM2 transcoders (TopK k={KS}, {n_latents} latents, {n_tokens} tokens each, batch 1024), "
          f"{args.threads} thread(s)")
    print("| layer | separate s | shared s | speed-up (target ≥ %.1f) |" % (0.8 * n))
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for layer in args.layers:
            times = {launcher: sweep(layer, n_tokens, n_latents, launcher, Path(tmp) / f"{layer}_{launcher}",
                                     args.threads) for launcher in ("basic", "shared_stream")}
            print(f"| {layer} | {times['basic']:.1f} | {times['shared_stream']:.1f} | "
                  f"{times['basic'] / times['shared_stream']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
