"""Tensor parallelism (`train.tensor_parallel`), on CPU with gloo: TP = 2 × DP = 2, then TP = 2 after a
resume on 2 ranks, follow the one-process loss curve and end at its weights for TopK, BatchTopK,
JumpReLU and ReLU, for a transcoder and a CLT; checkpoints are in the one-process layout."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import compose_cfg, one_thread  # noqa: F401  (a fixture)
from nn_decomp.config import UsageError, validate
from nn_decomp.runtime.checkpoint import TRAINER_STATE, load_dictionary
from nn_decomp.runtime.training import train
from tp_worker import TP_RUNS, run_cfg

TESTS = Path(__file__).resolve().parent
LOGGED = ("loss", "recon", "sparsity", "aux", "nmse", "l0", "dead_fraction", "tokens")
PER_RANK = ("nmse", "l0")  # data parallel logs the mean of the ranks' values (runtime/distributed.py)


def torchrun(n_ranks: int, out: Path, phase: str) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_ranks}",
                           "tp_worker.py", str(out), phase], cwd=TESTS, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def logged(run_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def assert_same_run(got: Path, want: Path, name: str) -> None:
    got_rows, want_rows = logged(got), logged(want)
    assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows] == list(range(1, 13)), name
    for key in LOGGED:
        # the data-parallel steps (1–6) log the mean of the ranks' FVU and L0 (runtime/distributed.py)
        rows = slice(6, None) if key in PER_RANK else slice(None)
        torch.testing.assert_close(torch.tensor([float(r[key]) for r in got_rows[rows]]),
                                   torch.tensor([float(r[key]) for r in want_rows[rows]]), rtol=1e-5, atol=1e-6,
                                   msg=f"{name} {key}")
    got_state, want_state = (torch.load(d / "checkpoint" / TRAINER_STATE, weights_only=False) for d in (got, want))
    assert got_state["coder"].keys() == want_state["coder"].keys()
    for entry, tensor in want_state["coder"].items():
        torch.testing.assert_close(got_state["coder"][entry], tensor, rtol=1e-5, atol=1e-6, msg=f"{name} {entry}")
    for i, moments in want_state["optimizer"]["state"].items():
        for key, tensor in moments.items():
            torch.testing.assert_close(got_state["optimizer"]["state"][i][key], tensor, rtol=1e-3, atol=1e-7,
                                       msg=f"{name} Adam {i} {key}")
    torch.testing.assert_close(got_state["tokens_since_fired"], want_state["tokens_since_fired"], rtol=0, atol=0)
    got_coder, want_coder = load_dictionary(got / "checkpoint"), load_dictionary(want / "checkpoint")
    for (entry, tensor), other in zip(want_coder.state_dict().items(), got_coder.state_dict().values()):
        torch.testing.assert_close(other, tensor, rtol=1e-4, atol=1e-5, msg=f"{name} saved {entry}")
    got_eval, want_eval = logged(got, "eval")[-1], logged(want, "eval")[-1]
    torch.testing.assert_close(got_eval["nmse"], want_eval["nmse"], rtol=1e-4, atol=1e-5)


def test_tensor_parallel_follows_one_process_and_resumes_across_world_sizes(tmp_path, one_thread):
    """Steps 1–6 on TP = 2 × DP = 2, steps 7–12 resumed on TP = 2 alone, against one process. Dead
    latents appear after 2 steps (train.dead_tokens=128), so AuxK's selection across shards runs."""
    torchrun(4, tmp_path / "tp", "mesh")
    torchrun(2, tmp_path / "tp", "resume")
    for arch, act in TP_RUNS:
        name = f"{arch}_{act}"
        train(run_cfg(arch, act), tmp_path / "one" / name)
        if act in ("topk", "batchtopk"):
            assert any(r["aux"] > 0 for r in logged(tmp_path / "one" / name)), name
        assert_same_run(tmp_path / "tp" / name, tmp_path / "one" / name, name)
        meta = json.loads((tmp_path / "tp" / name / "checkpoint" / "metadata.json").read_text())
        assert meta["world_size"] == 2 and meta["tensor_parallel"] == 2 and meta["n_latents"] == 64


@pytest.mark.parametrize("overrides, fix", [
    (["train.tensor_parallel=3"], "arch.n_latents=128 must split into 3 equal shards"),
    (["train.tensor_parallel=32", "act=topk", "act.k=4"], "of more than act.k=4 latents"),
    (["train.tensor_parallel=2", "arch.matryoshka=[16]"], "arch.matryoshka"),
    (["train.tensor_parallel=2", "train.dtype=float16"], "use train.dtype=bfloat16"),
])
def test_bad_tensor_parallel_settings_get_one_line(overrides, fix):
    with pytest.raises(UsageError, match=fix.replace("[", r"\[")):
        validate(compose_cfg("arch.n_latents=128", *overrides))


def test_more_shards_than_ranks_is_refused_before_any_compute(tmp_path):
    with pytest.raises(UsageError, match="must divide the number of ranks, 1"):
        train(run_cfg("transcoder", "topk", "train.tensor_parallel=2"), tmp_path)
    assert not (tmp_path / "checkpoint").exists()
