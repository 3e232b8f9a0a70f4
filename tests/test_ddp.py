"""Data-parallel training: `torchrun --nproc-per-node=2` on CPU (gloo) follows the one-process loss
curve on the same global batches, resumes, and leaves one set of files; LM contexts shard by rank."""
import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import torch

from helpers import arch_act_cfg
from nn_decomp.data.cache_file import build_cache
from nn_decomp.runtime.checkpoint import TRAINER_STATE
from nn_decomp.runtime.distributed import DistInfo
from nn_decomp.data.store import lm_stores
from nn_decomp.runtime.training import train

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.n_tokens=2048", "train.batch_size=128", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_every=8", "train.eval_tokens=256", "train.checkpoint_every=4", "train.device=cpu",
        "model.device=cpu", "data.context_size=32", "data.buffer_tokens=512", "data.lm_batch_size=8",
        "train.dead_tokens=512", "arch.layers=[1]", "model.name=tiny-test-lm"]


def torchrun(*overrides: str) -> None:
    env = os.environ | {"HYDRA_FULL_ERROR": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "nn_decomp.train", "arch.n_latents=64", "act.k=4", *overrides], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def test_two_ranks_follow_the_one_process_loss_curve_and_resume(tiny_lm, tmp_path):
    """TopK with AuxK (dead latents appear after 4 steps): the loss is a mean over tokens given the
    dead mask, so the rank-averaged gradient is the one-process gradient on the global batch."""
    cache = tmp_path / "cache.h5"
    build_cache(arch_act_cfg("transcoder", "topk", *TINY, "cache.chunk_rows=128", "cache.shuffle_tokens=512",
                             "cache.n_tokens=2048", f"cache.path={cache}"), tiny_lm)
    data = ["data=cache", f"data.path={cache}", "data.streams=4"]
    train(arch_act_cfg("transcoder", "topk", *TINY, *data), tmp_path / "one")
    two = tmp_path / "two"
    torchrun(*TINY, *data, "train.max_steps=6", f"hydra.run.dir={two}")
    assert torch.load(two / "checkpoint" / TRAINER_STATE, weights_only=False)["step"] == 6
    torchrun(*TINY, *data, "train.resume=true", f"hydra.run.dir={two}")

    one_rows, two_rows = train_rows(tmp_path / "one"), train_rows(two)
    assert [r["step"] for r in two_rows] == list(range(1, 17))  # rank 0 alone logged
    assert any(r["aux"] > 0 for r in one_rows)
    for key in ("loss", "recon", "aux", "tokens"):
        torch.testing.assert_close(torch.tensor([r[key] for r in two_rows]), torch.tensor([r[key] for r in one_rows]),
                                   rtol=1e-4, atol=1e-5, msg=key)
    one_state = torch.load(tmp_path / "one" / "checkpoint" / TRAINER_STATE, weights_only=False)
    two_state = torch.load(two / "checkpoint" / TRAINER_STATE, weights_only=False)
    for name, tensor in one_state["coder"].items():
        torch.testing.assert_close(two_state["coder"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    meta = json.loads((two / "checkpoint" / "metadata.json").read_text())
    assert meta["world_size"] == 2 and meta["tokens_seen"] == 2048
    names = {p.name for p in two.iterdir()}
    assert {"checkpoint", "metrics.json", "metrics.jsonl"} <= names
    assert not names & {"checkpoint.tmp", "checkpoint.old"}  # no half-written or stale copy
    assert json.loads((two / "checkpoint.prev" / "metadata.json").read_text())["step"] == 12  # the one before


def test_lm_contexts_are_sharded_by_rank(tiny_lm):
    cfg = arch_act_cfg("transcoder", "topk", *TINY)
    device = torch.device("cpu")
    whole = [c.tolist() for c in islice(lm_stores(cfg, tiny_lm, device, 128).train.contexts, 40)]
    shards = [[c.tolist() for c in islice(lm_stores(cfg, tiny_lm, device, 64, DistInfo(r, 2)).train.contexts, 20)]
              for r in range(2)]
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]
    assert lm_stores(cfg, tiny_lm, device, 64, DistInfo(1, 2)).train.batch_size == 64
