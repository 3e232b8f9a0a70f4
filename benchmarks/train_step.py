"""Speed of one TopK SAE training step on CPU: the dense reference path vs the sparse kernels.

    python benchmarks/train_step.py            # d_in 576, 9216 latents, batch 4096, k 32, fp32
    python benchmarks/train_step.py --quick    # small shapes, a smoke run

A step is what `Trainer.train_step` does: forward, loss (with AuxK when latents are dead),
backward, decoder-gradient projection, gradient clipping, Adam, decoder renormalisation and the
dead-latent counters. Data is random (x = y, an SAE); real activations come later.

The floor is one dense encoder GEMM [B×D]·[D×F] with its output allocation. Variants run
interleaved, and every step is paired with a floor GEMM timed just before it: "× floor" is the
median of these paired ratios, which cancels most of the load other processes put on the machine
(on a shared 2-core box that load swings single timings by 2×). ms/step is the median (minimum)
over rounds; round 0 is a warm-up.

Memory: torch's CPU allocations are invisible to tracemalloc, so each variant also runs alone in a
fresh subprocess (`--memory VARIANT`). "steady" is its resident set with parameters, Adam state and
data in place; the peak resident set (VmHWM) is then reset (`/proc/self/clear_refs` ← 5) and read
after two steps: "step MB" = peak − steady is the transient memory of a step. (ru_maxrss would not
do: a child inherits its parent's peak across fork + exec.)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from nn_decomp.activations import Latents, TopK
from nn_decomp.coder import CoderOutput, SparseCoder
from nn_decomp.kernels import aux_topk_latents, sparse_decode, sparse_encode
from nn_decomp.losses import LossOutput, coder_loss, squared_error


class Shapes(NamedTuple):
    d_in: int
    n_latents: int
    batch: int
    k: int


FULL, QUICK = Shapes(576, 9216, 4096, 32), Shapes(64, 512, 256, 8)


# --- the two paths ------------------------------------------------------------------------


def dense_loss(coder: SparseCoder, x, y, dead_LF) -> tuple[LossOutput, Latents]:
    """The current code: SparseCoder.forward and losses.coder_loss."""
    coder.sparse_backward = False  # the dense reference, also once SparseCoder defaults to kernels.py
    out = coder(x)
    return coder_loss(coder, out, y, dead_LF), out.latents


def sparse_loss(coder: SparseCoder, x, y, dead_LF) -> tuple[LossOutput, Latents]:
    """The same objective through kernels.py, as the recommended integration computes it."""
    act = coder.activation
    latents, pre = sparse_encode(x, coder.W_enc, coder.b_enc, act)
    recon = sparse_decode(latents, coder.W_dec, coder.d_out) + coder.b_dec
    out = CoderOutput(pre, latents, recon)
    loss = recon_loss = squared_error(recon, y)
    aux = recon.new_zeros(())
    n_dead = int(dead_LF.sum())
    if n_dead:
        k_aux = act.k_aux or coder.d_out // 2
        aux_latents = aux_topk_latents(pre, dead_LF, min(k_aux, int(dead_LF.sum(-1).max())), x, coder.W_enc,
                                       coder.b_enc)
        residual_hat = sparse_decode(aux_latents, coder.W_dec, coder.d_out)
        aux = min(n_dead / (k_aux * coder.n_layers), 1.0) * squared_error(residual_hat, (y - recon).detach())
        loss = loss + act.aux_coef * aux
    zero = recon.new_zeros(())
    return LossOutput(loss, recon_loss, zero, aux, zero, zero), out.latents


def dense_fired(latents: Latents) -> torch.Tensor:
    return (latents.dense() != 0).any(0)


def sparse_fired(latents: Latents) -> torch.Tensor:
    return latents.fired()


@dataclass
class Variant:
    name: str
    loss_fn: Callable
    fired_fn: Callable
    adam_fused: bool = False
    dead_fraction: float = 0.0


VARIANTS = {v.name: v for v in [
    Variant("dense", dense_loss, dense_fired),
    Variant("sparse", sparse_loss, sparse_fired),
    Variant("sparse+fusedAdam", sparse_loss, sparse_fired, adam_fused=True),
    Variant("dense AuxK", dense_loss, dense_fired, dead_fraction=0.5),
    Variant("sparse AuxK", sparse_loss, sparse_fired, dead_fraction=0.5),
]}


# --- one training step --------------------------------------------------------------------


class Run:
    """One variant's coder, optimizer and data; `step` mirrors Trainer.train_step."""

    def __init__(self, variant: Variant, shapes: Shapes, seed: int = 0):
        torch.manual_seed(seed)
        self.variant = variant
        D, Fl = shapes.d_in, shapes.n_latents
        self.coder = SparseCoder(D, D, Fl, 1, TopK(shapes.k, None, aux_coef=1 / 32), dec_init_norm=1.0,
                                 tied_init=True)
        self.optimizer = torch.optim.Adam(self.coder.parameters(), lr=1e-3, betas=(0.9, 0.999),
                                          fused=variant.adam_fused or None)
        self.x = torch.randn(shapes.batch, 1, D)
        self.dead_LF = torch.rand(1, Fl) < variant.dead_fraction
        self.tokens_since_fired_LF = torch.zeros(1, Fl, dtype=torch.long)
        self.phases = {"fwd+loss": [], "backward": [], "update": [], "total": []}

    def init_optimizer_state(self) -> None:
        """Adam's moments exist from the first step on; create them so memory counts them as steady."""
        for p in self.coder.parameters():
            p.grad = torch.zeros_like(p)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.param_groups[0]["lr"] = 0.0
        self.optimizer.step()
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        coder, t0 = self.coder, time.perf_counter()
        losses, latents = self.variant.loss_fn(coder, self.x, self.x, self.dead_LF)
        t1 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        losses.loss.backward()
        t2 = time.perf_counter()
        coder.remove_parallel_decoder_grad()
        torch.nn.utils.clip_grad_norm_(coder.parameters(), 1.0)
        self.optimizer.step()
        coder.set_decoder_norm(1.0)
        self.tokens_since_fired_LF += self.x.shape[0]
        self.tokens_since_fired_LF[self.variant.fired_fn(latents)] = 0
        t3 = time.perf_counter()
        for name, dt in zip(self.phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            self.phases[name].append(dt)
        return losses.loss.item()


def floor_gemm(x_BD: torch.Tensor, W_DF: torch.Tensor) -> float:
    t0 = time.perf_counter()
    x_BD @ W_DF
    return time.perf_counter() - t0


# --- memory (one variant per fresh process) -----------------------------------------------


def proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def measure_memory(name: str, shapes: Shapes, steps: int) -> dict:
    if name == "floor":
        x, W = torch.randn(shapes.batch, shapes.d_in), torch.randn(shapes.d_in, shapes.n_latents)
        step = lambda: floor_gemm(x, W)  # noqa: E731
    else:
        run = Run(VARIANTS[name], shapes)
        run.init_optimizer_state()
        step = run.step
    steady = proc_status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set (Linux ≥ 4.0)
    for _ in range(steps):
        step()
    peak = proc_status_mb("VmHWM")
    return {"steady_mb": steady, "peak_mb": peak, "step_peak_mb": peak - steady}


def memory_in_subprocess(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--memory", name, "--threads", str(args.threads)]
    cmd += ["--quick"] if args.quick else []
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per variant (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = QUICK if args.quick else FULL
    if args.memory:
        print(json.dumps(measure_memory(args.memory, shapes, steps=2)))
        return

    print(f"torch {torch.__version__}, {args.threads} threads; d_in={shapes.d_in} F={shapes.n_latents} "
          f"B={shapes.batch} k={shapes.k} fp32; {args.rounds} rounds", flush=True)
    runs = {name: Run(VARIANTS[name], shapes) for name in args.variants}
    x_BD, W_DF = torch.randn(shapes.batch, shapes.d_in), torch.randn(shapes.d_in, shapes.n_latents)
    floor_times, ratios = [], {name: [] for name in runs}
    for round_ in range(args.rounds + 1):
        for name, run in runs.items():
            floor_times.append(floor_gemm(x_BD, W_DF))
            run.step()
            ratios[name].append(run.phases["total"][-1] / floor_times[-1])
        print(f"round {round_}: floor {1e3 * floor_times[-1]:.0f} ms, "
              + ", ".join(f"{n} {1e3 * r.phases['total'][-1]:.0f} ms" for n, r in runs.items()), flush=True)
    floor_times = floor_times[len(runs):]  # round 0 is the warm-up
    floor = statistics.median(floor_times)
    memory = {} if args.no_memory else {n: memory_in_subprocess(n, args) for n in ["floor", *runs]}

    print(f"\nmedian over {args.rounds} rounds (min in brackets); × floor: median of step / the GEMM timed "
          "just before it; vs dense: median speed-up over the dense path")
    header = (f"{'variant':18s} {'ms/step':>15s} {'fwd+loss':>9s} {'backward':>9s} {'update':>8s} "
              f"{'tokens/s':>9s} {'× floor':>8s} {'vs dense':>9s} {'peak MB':>8s} {'step MB':>8s}")
    print(header + "\n" + "-" * len(header))
    def mem_cols(name: str) -> str:
        m = memory.get(name)
        return f"{m['peak_mb']:8.0f} {m['step_peak_mb']:8.0f}" if m else f"{'-':>8s} {'-':>8s}"

    print(f"{'floor GEMM':18s} {1e3 * floor:7.0f} ({1e3 * min(floor_times):5.0f}) {'':9s} {'':9s} {'':8s} "
          f"{shapes.batch / floor:9.0f} {1.0:8.2f} {'':9s} {mem_cols('floor')}")
    for name, run in runs.items():
        med = {p: statistics.median(ts[1:]) for p, ts in run.phases.items()}
        ref = runs.get("dense AuxK" if VARIANTS[name].dead_fraction else "dense")
        speedup = statistics.median(ref.phases["total"][1:]) / med["total"] if ref else float("nan")
        print(f"{name:18s} {1e3 * med['total']:7.0f} ({1e3 * min(run.phases['total'][1:]):5.0f}) "
              f"{1e3 * med['fwd+loss']:9.0f} {1e3 * med['backward']:9.0f} {1e3 * med['update']:8.0f} "
              f"{shapes.batch / med['total']:9.0f} {statistics.median(ratios[name][1:]):8.2f} {speedup:8.2f}× "
              f"{mem_cols(name)}")
    print("\nAuxK rows: 50% of latents dead, k_aux = d_in/2 (the default). "
          "peak MB: peak resident set of a fresh process running the variant alone; step MB = peak − steady.")


if __name__ == "__main__":
    main()
