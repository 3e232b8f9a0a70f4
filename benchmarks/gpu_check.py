"""The GPU check (`benchmarks/gpu_check.sh`): one script, one GPU, under 8 minutes.

    bash benchmarks/gpu_check.sh              # on a CUDA machine: sizes below, fp32 and bf16
    bash benchmarks/gpu_check.sh --dry-run    # the same code paths at tiny sizes on CPU (the test suite runs it)

(a) Gradients: for every activation (SAE and transcoder) and a 3-layer CLT, the sparse training step
    (`SparseCoder.forward` + `coder_loss`, AuxK on: a quarter of the latents dead) against the dense
    reference on the device: loss and every parameter gradient, largest relative error.
(b) Speed: one training step of ours, sparsify (its Triton kernels when `triton` imports) and
    SAELens at d 2048, F 32768 and 131072, B 4096, k 32, each library with fused Adam and the same
    dead latents (benchmarks/train_step.py's rows and `Setting`), fp32 and bf16 (the step under
    `torch.autocast` for every library alike; master weights stay fp32).
(c) Per row: ms/step, tokens/s, peak device memory (`max_memory_allocated` over its steps), and the
    encoder GEMM's share of the step (the floor GEMM [B×D]·[D×F] timed before each step / the step).
(d) One table on stdout.

The data are Gaussian rows scaled to E‖x‖² = d (no offline LM has d 2048); a step's cost does not
depend on what the rows mean. Libraries not installed are named and skipped.
"""
import argparse
import copy
import importlib.util
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import (ACT_NAMES, ACTS, Batch, Runner, Setting, Shapes, Variant, build, compose_cfg,  # noqa: E402
                        row_name, time_rows)


class Plan(NamedTuple):
    device: str
    shapes: list[Shapes]
    dtypes: list[str]
    rounds: int


FULL = Plan("cuda", [Shapes(2048, 32768, 4096, 32), Shapes(2048, 131072, 4096, 32)], ["fp32", "bf16"], 5)
DRY = Plan("cpu", [Shapes(32, 256, 128, 4)], ["fp32", "bf16"], 1)
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


# --- (a) gradients -----------------------------------------------------------------------------

def gradient_case(arch: str, act: str, d: int, device: str) -> float:
    """Largest relative error, over the loss and every gradient, of the sparse step vs the dense one."""
    from nn_decomp.runtime.checkpoint import build_coder
    from nn_decomp.core.losses import coder_loss
    torch.manual_seed(0)
    layers = 3 if arch == "clt" else 1
    cfg = compose_cfg(Variant("", "ours", act, arch, layers), Shapes(d, 8 * d, 64, 8), Setting(device=device))
    sparse = build_coder(cfg, d, d).to(device)
    with torch.no_grad():
        sparse.b_enc.normal_(0, 0.1)
        sparse.b_dec.normal_(0, 0.1)
        if act == "jumprelu":
            sparse.activation.log_threshold.fill_(-2.0)  # θ inside the pre-activations' range
    dense = copy.deepcopy(sparse)
    dense.sparse_backward = False
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(64, layers, d, generator=g, device=device)
    y = x if arch == "sae" else torch.randn(64, layers, d, generator=g, device=device)
    dead = torch.rand(layers, sparse.n_latents, generator=g, device=device) < 0.25
    errors = []
    for coder in (sparse, dense):
        loss = coder_loss(coder, coder(x), y, dead).loss
        loss.backward()
        errors.append([loss.detach()] + [p.grad for _, p in sorted(coder.named_parameters()) if p.grad is not None])
    return max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() for a, b in zip(*errors))


def check_gradients(device: str, d: int) -> bool:
    print(f"(a) sparse vs dense step on {device} (largest relative error over the loss and every gradient):")
    ok = True
    for arch, act in [(arch, act) for arch in ("sae", "transcoder") for act in ACTS] + [("clt", "topk")]:
        err = gradient_case(arch, act, d, device)
        ok &= err < 1e-4
        print(f"    {arch:10s} {ACT_NAMES[act]:9s} {err:.1e} {'ok' if err < 1e-4 else 'FAILED'}")
    return ok


# --- (b, c) speed and memory -----------------------------------------------------------------------

def rows(installed: set[str]) -> list[Variant]:
    out = [Variant(row_name("ours", act, "sae"), "ours", act, "sae") for act in ACTS]
    out += [Variant(row_name("sparsify", "topk", "sae"), "sparsify", "topk", "sae")] * ("sparsify" in installed)
    out += [Variant(row_name("saelens", act, "sae"), "saelens", act, "sae") for act in ("topk", "batchtopk")
            if "saelens" in installed]
    out += [Variant(row_name("ours", "topk", "transcoder"), "ours", "topk", "transcoder")]
    out += [Variant(row_name("sparsify", "topk", "transcoder"), "sparsify", "topk", "transcoder")] * (
        "sparsify" in installed)
    return out


def autocast(runner: Runner, device: str, dtype: torch.dtype | None) -> Runner:
    if dtype is None:
        return runner

    def step() -> float:
        with torch.autocast(device_type=device, dtype=dtype):
            return runner.step()

    return Runner(step, runner.optimizer)


def peak_memory_mb(runner: Runner, device: str) -> float:
    if device != "cuda":
        return float("nan")
    torch.cuda.reset_peak_memory_stats()
    runner.step()
    return torch.cuda.max_memory_allocated() / 2**20


def time_table(plan: Plan, shapes: Shapes, dtype: str, installed: set[str]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shapes.batch * (plan.rounds + 1), 1, shapes.d_in, generator=g)
    y = torch.randn(x.shape, generator=g)
    batch = Batch(x, y)  # Gaussian rows: E‖x‖² = d, as the trainer normalises
    setting = Setting(device=plan.device)
    runners = {v.name: autocast(build(v, shapes, batch, setting), plan.device, DTYPES[dtype]) for v in rows(installed)}
    x_BD = x[:shapes.batch, 0].to(plan.device)
    times, ratios, l0s, _ = time_rows(runners, shapes, x_BD, plan.rounds)
    memory = {n: peak_memory_mb(r, plan.device) for n, r in runners.items()}
    print(f"\n(b) d={shapes.d_in} F={shapes.n_latents} B={shapes.batch} k={shapes.k} {dtype}, {plan.rounds} rounds")
    header = f"    {'row':28s} {'ms/step':>8s} {'tokens/s':>10s} {'GEMM share':>10s} {'peak MB':>9s} {'L0':>6s}"
    print(header + "\n    " + "-" * (len(header) - 4))
    for name in runners:
        ms = 1e3 * statistics.median(times[name])
        share = 1 / statistics.median(ratios[name])
        print(f"    {name:28s} {ms:8.1f} {1e3 * shapes.batch / ms:10.0f} {share:10.0%} {memory[name]:9.0f} {l0s[name]:6.1f}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: the code paths, not the numbers")
    args = parser.parse_args(argv)
    plan = DRY if args.dry_run else FULL
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device — run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    installed = {name for name, module in (("sparsify", "sparsify"), ("saelens", "sae_lens"), ("triton", "triton"))
                 if importlib.util.find_spec(module)}
    device_name = torch.cuda.get_device_name() if plan.device == "cuda" else "cpu (dry run)"
    print(f"gpu_check: torch {torch.__version__}, {device_name}; installed peers: {sorted(installed)}"
          + ("" if "sparsify" in installed else "; sparsify not installed: its rows skipped (pip install -e .[bench])"))
    ok = check_gradients(plan.device, plan.shapes[0].d_in if args.dry_run else 64)
    for shapes in plan.shapes:
        for dtype in plan.dtypes:
            time_table(plan, shapes, dtype, installed)
    print("\ngradients: " + ("all ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
