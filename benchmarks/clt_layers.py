"""The CLT's training step over 2 … 30 layers: time, peak memory and training state, against a set of
per-layer transcoders of the same depth.

    python benchmarks/clt_layers.py                          # L = 2, 4, 8, 16, 30; F 1024 per layer; TopK k 16
    python benchmarks/clt_layers.py --n-latents 512 --json outputs/bench/clt_layers_512.json
    python benchmarks/clt_layers.py --act batchtopk           # or jumprelu (θ set so that ≈ k fire)
    python benchmarks/clt_layers.py --device cuda             # on a GPU: memory from the CUDA allocator
    python benchmarks/clt_layers.py --dead-fraction 0.25      # a quarter of the latents dead: AuxK runs
    python benchmarks/clt_layers.py --quick                   # tiny shapes, a smoke run (the test suite's)
    python benchmarks/clt_layers.py --report out.json         # the tables of a saved run again

Shape: SmolLM2-135M's MLP (d_in = d_out = 576), `--n-latents` per layer, `--k` latents per token and
layer, a batch of 1024 Gaussian rows (a step's cost does not depend on what the rows mean; the
rows are normalised by the trainer as in a real run). One torch thread by default (`--threads`), so
that rows measured on a shared machine compare among themselves.

Rows, each in a fresh subprocess (its peak is its own):
- `CLT L`: `arch=clt` over layers 0..L−1, untied (W_dec[i] is [F, L−i, D]).
- `PLT set L`: L `arch=transcoder` coders, one per layer, each with its own Trainer: what exp_003
  trains as L jobs (the per-layer hooks differ, so they cannot share one stream in `train_together`).
  One "step" is one step of each of the L; its memory is that of all L held at once.
- `CLT tied L` (the deepest L only): `arch.decoder_tying=per_source arch.per_target_scale=true`.
Each is built as training builds it (`runtime.training.init_coder`: `build_coder`, normalisation
scales and b_dec from the rows; `runtime.trainer.Trainer`) and stepped by `Trainer.train_step`
(forward, loss, backward, clip, fused Adam, lr scheduler, dead-latent counters).

Measured per row: ms/step (median of `--steps`, after `--warmup` steps that also create Adam's
state); `clip+Adam`: the gradient clip and Adam step alone, timed after the steps on the last
gradients; the training state (parameters, gradients and Adam's moments, summed over the real
tensors) against what a dense [L, L, F, D] decoder would hold; memory: CPU — VmRSS before the
coder is built (base), after the warm-up (steady: parameters, gradients, Adam state, workspaces),
and VmHWM over the timed steps (reset by /proc/self/clear_refs), so "peak" = VmHWM − base is the
row's own growth and "step" = VmHWM − steady a step's transient; CUDA — the same three from
`memory_allocated` / `max_memory_allocated`. `live rows`: the share of W_dec[i]'s gradient rows
(one per latent, (L−i)·D wide) that are non-zero after a step (latents some token selected): the
gradient is stored dense whatever that share is.
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from nn_decomp.runtime.distributed import SINGLE
from nn_decomp.runtime.tensor_parallel import clip_grad_norm_
from nn_decomp.runtime.trainer import Trainer
from nn_decomp.runtime.training import init_coder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import DEAD_TOKENS, TOTAL_STEPS, dead_mask, proc_status_mb, set_sparsity, sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLOAT_BYTES = 4  # fp32 parameters, gradients and Adam moments


class Spec(NamedTuple):
    """One row, as the parent passes it to the child (JSON)."""

    family: str  # "clt" | "plt" | "clt_tied"
    n_layers: int
    act: str
    n_latents: int
    d: int
    batch: int
    k: int
    steps: int
    warmup: int
    device: str
    dead_fraction: float
    threads: int


def row_name(spec: Spec) -> str:
    return {"clt": "CLT", "plt": "PLT set", "clt_tied": "CLT tied"}[spec.family] + f" {spec.n_layers}"


# --- the child: one row ------------------------------------------------------------------------


def compose_cfg(spec: Spec, arch: str, layers: list[int], extra: list[str] = ()):
    from hydra import compose, initialize_config_dir
    overrides = [f"arch={arch}", f"act={spec.act}", f"arch.n_latents={spec.n_latents}",
                 f"arch.layers=[{','.join(map(str, layers))}]", f"train.batch_size={spec.batch}",
                 f"train.dead_tokens={DEAD_TOKENS}", f"model.device={spec.device}", *extra]
    overrides += [f"act.k={spec.k}"] * (spec.act in ("topk", "batchtopk"))
    overrides += [f"act.target_l0={spec.k}"] * (spec.act == "jumprelu")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


class Member(NamedTuple):
    """One coder in training: its Trainer, which layers of the batch it reads, its dead latents."""

    trainer: object
    layers: slice
    dead_LF: torch.Tensor


def build_members(spec: Spec, x_NLD: torch.Tensor, y_NLD: torch.Tensor) -> list[Member]:
    """The CLT (one member) or the L per-layer transcoders, each as `open_run` builds it."""
    L = spec.n_layers
    if spec.family == "plt":
        plan = [("transcoder", [i], slice(i, i + 1), []) for i in range(L)]
    else:
        tied = ["arch.decoder_tying=per_source", "arch.per_target_scale=true"] * (spec.family == "clt_tied")
        plan = [("clt", list(range(L)), slice(0, L), tied)]
    members = []
    for n, (arch, layers, sl, extra) in enumerate(plan):
        torch.manual_seed(n)
        cfg = compose_cfg(spec, arch, layers, extra)
        coder, scale_in, scale_out = init_coder(cfg, (x_NLD[:, sl], y_NLD[:, sl]), spec.device)
        set_sparsity(coder, x_NLD[:spec.batch, sl] * scale_in[:, None], spec.k)  # JumpReLU: ≈ k fire
        trainer = Trainer(cfg, coder, TOTAL_STEPS, scale_in, scale_out)
        dead_LF = dead_mask(coder.n_sources, coder.n_latents, spec.dead_fraction, spec.device)
        members.append(Member(trainer, sl, dead_LF))
    return members


def state_bytes(members: list[Member]) -> dict:
    """Parameters, gradients and optimizer state, summed over the tensors that exist."""
    params = grads = adam = n_params = 0
    for m in members:
        for p in m.trainer.coder.parameters():
            n_params += p.numel()
            params += p.numel() * p.element_size()
            grads += 0 if p.grad is None else p.grad.numel() * p.grad.element_size()
        for state in m.trainer.optimizer.state.values():
            adam += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return {"n_params": n_params, "params_mb": params / 2**20, "grads_mb": grads / 2**20, "adam_mb": adam / 2**20}


def live_grad_rows(members: list[Member]) -> float:
    """Share of decoder-gradient rows (one per latent and source) that are non-zero."""
    live = total = 0
    for m in members:
        for w in m.trainer.coder.W_dec:
            rows_F = w.grad.flatten(1).ne(0).any(1)
            live, total = live + int(rows_F.sum()), total + len(rows_F)
    return live / total


def memory_mb(device: str, field: str) -> float:
    """field: "now" or "peak" — resident set / VmHWM on CPU, allocated / max allocated on CUDA."""
    if device.startswith("cuda"):
        return (torch.cuda.memory_allocated() if field == "now" else torch.cuda.max_memory_allocated()) / 2**20
    return proc_status_mb("VmRSS" if field == "now" else "VmHWM")


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM ← the current resident set (Linux ≥ 4.0)


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def run_row(spec: Spec) -> dict:
    torch.set_num_threads(spec.threads)
    dev, B, L = spec.device, spec.batch, spec.n_layers
    n_batches = 2  # cycled; as many rows again init the scales and b_dec, as init_rows would
    gen = torch.Generator().manual_seed(0)
    x_NLD, y_NLD = (torch.randn(n_batches * B, L, spec.d, generator=gen).to(dev) for _ in range(2))
    # The first fused Adam imports ~800 modules (≈70 MB, torch._dynamo among them): loaded here, not
    # counted as the coder's.
    w = torch.zeros(1, device=dev, requires_grad=True)
    w.grad = torch.zeros_like(w)
    torch.optim.Adam([w], fused=True).step()
    base = memory_mb(dev, "now")
    members = build_members(spec, x_NLD, y_NLD)
    batches = list(zip(x_NLD.split(B), y_NLD.split(B)))
    count = [0]

    def step() -> float:
        x_BLD, y_BLD = batches[count[0] % n_batches]
        count[0] += 1
        l0 = 0.0
        for m in members:
            m.trainer.tokens_since_fired_LF[m.dead_LF] = DEAD_TOKENS  # the fixed dead set (AuxK), if any
            l0 += m.trainer.train_step(x_BLD[:, m.layers], y_BLD[:, m.layers]).l0_L.sum().item()
        return l0

    for _ in range(spec.warmup):  # also creates Adam's moments
        l0 = step()
    steady = memory_mb(dev, "now")
    reset_peak(dev)
    times = [timed(step, dev) for _ in range(spec.steps)]
    peak = memory_mb(dev, "peak")
    state, live = state_bytes(members), live_grad_rows(members)

    # The dense passes over every parameter, alone, on the last step's gradients (after the steps:
    # they move the weights).
    def clip() -> None:
        for m in members:
            clip_grad_norm_(m.trainer.coder, {}, m.trainer.cfg.train.grad_clip, SINGLE)

    def adam() -> None:
        for m in members:
            m.trainer.optimizer.step()

    clip_s = statistics.median(timed(clip, dev) for _ in range(3))
    adam_s = statistics.median(timed(adam, dev) for _ in range(3))
    return {"row": row_name(spec), **spec._asdict(), "ms": 1e3 * statistics.median(times),
            "ms_all": [1e3 * t for t in times], "clip_ms": 1e3 * clip_s, "adam_ms": 1e3 * adam_s, "l0": l0,
            **state, "live_grad_rows": live, "base_mb": base, "steady_mb": steady - base,
            "peak_mb": peak - base, "step_mb": peak - steady}


# --- the parent: rows, table, fits --------------------------------------------------------------


def square_state_mb(r: dict) -> float | None:
    """An untied CLT's training state (params + grads + 2 Adam moments) if its decoder were a dense
    [L, L, F, D]: the real state with the triangle Σ_i F·(L−i)·D replaced by L²·F·D."""
    if r["family"] != "clt":
        return None
    L, F, D = r["n_layers"], r["n_latents"], r["d"]
    triangle, square = F * D * L * (L + 1) // 2, L * L * F * D
    return (r["n_params"] - triangle + square) * 4 * FLOAT_BYTES / 2**20


def run_in_subprocess(spec: Spec) -> dict | None:
    cmd = [sys.executable, __file__, "--row", json.dumps(spec._asdict())]
    env = os.environ | {"OMP_NUM_THREADS": str(spec.threads), "MKL_NUM_THREADS": str(spec.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        print(f"{row_name(spec)} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def growth_exponent(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of log(key) against log(L): value ∝ L^slope over the measured range."""
    pts = [(r["n_layers"], r[key]) for r in rows if r[key] > 0]
    if len(pts) < 2:
        return None
    xs, ys = zip(*((math.log(L), math.log(v)) for L, v in pts))
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def local_exponent(rows: list[dict], key: str) -> float | None:
    """The slope between the two deepest rows (the asymptotic regime)."""
    if len(rows) < 2:
        return None
    a, b = sorted(rows, key=lambda r: r["n_layers"])[-2:]
    return math.log(b[key] / a[key]) / math.log(b["n_layers"] / a["n_layers"])


def report(results: list[dict], args) -> dict:
    unit = "alloc" if args.device.startswith("cuda") else "RSS"
    print(f"\nms/step: median of {args.steps} steps after {args.warmup} warm-up; "
          f"clip+Adam: those two alone; state: params + grads + Adam moments (real tensors); [L,L,F,D]: an "
          f"untied CLT's state with a dense square decoder; steady / peak: {unit} growth over the row's base after the "
          f"warm-up / at its highest in the timed steps; step: peak − steady; live rows: "
          "non-zero rows of the W_dec gradient")
    header = (f"{'row':13s} {'params M':>9s} {'state MB':>9s} {'[L,L,F,D]':>10s} {'ms/step':>8s} {'clip+Adam':>9s} "
              f"{'steady MB':>9s} {'peak MB':>8s} {'step MB':>8s} {'L0':>6s} {'live rows':>9s}")
    print(header + "\n" + "-" * len(header))
    for r in results:
        state = r["params_mb"] + r["grads_mb"] + r["adam_mb"]
        square = "-" if (sq := square_state_mb(r)) is None else f"{sq:.0f}"
        print(f"{r['row']:13s} {r['n_params'] / 1e6:9.2f} {state:9.0f} {square:>10s} {r['ms']:8.0f} "
              f"{r['clip_ms'] + r['adam_ms']:9.0f} {r['steady_mb']:9.0f} {r['peak_mb']:8.0f} {r['step_mb']:8.0f} "
              f"{r['l0']:6.0f} {r['live_grad_rows']:9.1%}")
    by = {f: sorted((r for r in results if r["family"] == f), key=lambda r: r["n_layers"]) for f in ("clt", "plt")}
    ratios = []
    print("\nCLT / PLT set at the same L (time, peak memory, training state)")
    plt = {r["n_layers"]: r for r in by["plt"]}
    for c in by["clt"]:
        if (p := plt.get(c["n_layers"])) is None:
            continue
        state = [r["params_mb"] + r["grads_mb"] + r["adam_mb"] for r in (c, p)]
        ratios.append({"n_layers": c["n_layers"], "time": c["ms"] / p["ms"], "peak": c["peak_mb"] / p["peak_mb"],
                       "state": state[0] / state[1]})
        print(f"  L={c['n_layers']:2d}  time {ratios[-1]['time']:6.2f}×  peak {ratios[-1]['peak']:6.2f}×  "
              f"state {ratios[-1]['state']:6.2f}×")
    exponents = {}
    print("\ngrowth with L: exponent a of value ∝ L^a (least squares over all L; between the two deepest)")
    for f, rows in by.items():
        for key in ("ms", "peak_mb", "params_mb"):
            exponents[f"{f} {key}"] = {"fit": growth_exponent(rows, key), "last": local_exponent(rows, key)}
            e = exponents[f"{f} {key}"]
            if e["fit"] is not None:
                print(f"  {f:3s} {key:9s} {e['fit']:5.2f} (last pair {e['last']:5.2f})")
    tied = [r for r in results if r["family"] == "clt_tied"]
    untied = {r["n_layers"]: r for r in by["clt"]}
    for t in tied:
        if (u := untied.get(t["n_layers"])) is not None:
            print(f"\ntied / untied CLT at L={t['n_layers']}: time {t['ms'] / u['ms']:.2f}×, "
                  f"peak {t['peak_mb'] / u['peak_mb']:.2f}×, params {t['n_params'] / u['n_params']:.2f}×")
    return {"ratios": ratios, "exponents": exponents}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16, 30])
    parser.add_argument("--n-latents", type=int, default=1024, help="latents per layer")
    parser.add_argument("--k", type=int, default=16, help="latents per token and layer (TopK / BatchTopK k)")
    parser.add_argument("--act", choices=["topk", "batchtopk", "jumprelu"], default="topk")
    parser.add_argument("--batch", type=int, default=1024, help="tokens per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: comparable on a busy machine)")
    parser.add_argument("--dead-fraction", type=float, default=0.0,
                        help="latents held dead at every step, so AuxK runs (train_step.py's 0.25); 0: none")
    parser.add_argument("--no-plt", action="store_true", help="CLT rows only")
    parser.add_argument("--no-tied", action="store_true", help="no tied CLT row")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (d 64, F 128, B 128, L 2 and 3)")
    parser.add_argument("--json", help="write the rows and fits here")
    parser.add_argument("--report", metavar="JSON", help="print the tables of a saved --json run and exit")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(Spec(**json.loads(args.row)))))
        return
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        report(saved["rows"], argparse.Namespace(**saved["args"]))
        return
    d = 576
    if args.quick:
        d, args.n_latents, args.batch, args.k, args.layers, args.steps, args.warmup = 64, 128, 128, 4, [2, 3], 2, 1
    common = dict(act=args.act, n_latents=args.n_latents, d=d, batch=args.batch, k=args.k, steps=args.steps,
                  warmup=args.warmup, device=args.device, dead_fraction=args.dead_fraction, threads=args.threads)
    specs = [Spec(f, L, **common) for L in args.layers for f in ("clt", "plt")[:1 + (not args.no_plt)]]
    specs += [Spec("clt_tied", max(args.layers), **common)] * (not args.no_tied)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.device}, {platform.processor() or '?'}; "
          f"d {d}, F {args.n_latents} per layer, {args.act} k {args.k}, B {args.batch}, "
          f"{args.dead_fraction:.0%} dead; a fresh process per row", flush=True)
    results = []
    for spec in specs:
        t0 = time.time()
        if (r := run_in_subprocess(spec)) is not None:
            results.append(r)
            print(f"  {r['row']:13s} {r['ms']:8.0f} ms/step  ({time.time() - t0:.0f} s)", flush=True)
    fits = report(results, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": results,
                                               **fits}, indent=2))
    if len(results) < len(specs):
        sys.exit(1)


if __name__ == "__main__":
    main()
