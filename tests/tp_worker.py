"""Run by tests/test_tensor_parallel.py under torchrun: trains every (arch, act) of TP_RUNS with
train.tensor_parallel=2 on the world torchrun gives (2 ranks: TP = 2; 4 ranks: TP = 2 × DP = 2).

    torchrun --nproc-per-node=4 tests/tp_worker.py OUT_DIR mesh     # TP = 2 × DP = 2 to step 6
    torchrun --nproc-per-node=2 tests/tp_worker.py OUT_DIR resume   # resumed on 2 ranks: TP = 2
"""
import sys
from pathlib import Path

from helpers import arch_act_cfg
from nn_decomp.runtime.training import train

TP_RUNS = [(arch, act) for arch in ("transcoder", "clt") for act in ("topk", "batchtopk", "jumprelu", "relu")]
TINY = ["data=synthetic", "data.n_features=48", "data.d_in=16", "data.d_out=16", "data.n_parents=2",
        "data.mean_l0=3", "train.n_tokens=768", "train.batch_size=64", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_every=6", "train.eval_tokens=256", "train.checkpoint_every=3", "train.dead_tokens=128",
        "train.device=cpu", "model.device=cpu"]


def run_cfg(arch: str, act: str, *overrides: str):
    return arch_act_cfg(arch, act, *TINY, *overrides, n_latents=64, k=4, n_layers=2)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    # 4 ranks: TP = 2 × DP = 2, stopped at step 6; 2 ranks: the same runs resumed (TP = 2, no DP)
    overrides = ["train.max_steps=6"] if sys.argv[2] == "mesh" else ["train.resume=true"]
    for arch, act in TP_RUNS:
        train(run_cfg(arch, act, "train.tensor_parallel=2", *overrides), out / f"{arch}_{act}")
