"""TopK/BatchTopK → JumpReLU: the threshold estimators on hand-made pre-activations, calibration by
bisection, and a tiny trained dictionary converted at matched L0 within a few percent NMSE."""
import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import CONF, arch_act_cfg, make_coder, one_thread  # noqa: F401  (one_thread: fixture)
from nn_decomp.core.activations import JumpReLU
from nn_decomp.runtime.checkpoint import load_dictionary, read_config
from nn_decomp.analysis.conversion import (calibrate_scale, convert, fit_thresholds, jumprelu_coder, min_thresholds,
                                           rate_thresholds)
from nn_decomp.config import UsageError
from nn_decomp.runtime.trainer import evaluate_coder
from nn_decomp.runtime.training import setup, train
from test_evaluate import run_cli
from test_train import tiny_cfg

PRE_NF = torch.tensor([[3.0, 1.0, 0.5], [2.0, 5.0, 0.1], [1.0, 4.0, 0.7], [0.0, 2.0, 0.2]])
ACTIVE_NF = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)


def convert_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("convert", overrides=["device=cpu", "n_tokens=4096", "n_eval_tokens=4096", *overrides])


def test_rate_thresholds_keep_each_latents_firing_count():
    theta = rate_thresholds(PRE_NF, ACTIVE_NF, chunk=2)
    # latent 0 is active once: θ = its 2nd largest value; latent 1 twice: its 3rd largest;
    # latent 2 never: its largest, so it stays silent.
    assert theta.tolist() == pytest.approx([2.0, 2.0, 0.7])
    assert (PRE_NF > theta).sum(0).tolist() == ACTIVE_NF.sum(0).tolist()


def test_min_thresholds_keep_every_selected_activation():
    theta = min_thresholds(PRE_NF, ACTIVE_NF)
    assert theta[0] < 3.0 and theta[0] == pytest.approx(3.0) and theta[1] == pytest.approx(4.0)
    assert theta[2] == pytest.approx(0.7)
    fires = PRE_NF > theta
    assert (fires | ~ACTIVE_NF).all()  # wherever the source selected, the JumpReLU fires
    assert fires.sum(0).tolist() == [1, 2, 0]


def test_calibration_bisects_the_scale_to_the_target_l0():
    pre_NF = torch.rand(1000, 50, generator=torch.Generator().manual_seed(0))
    theta_F = torch.full((50,), 0.5)
    scale = calibrate_scale(pre_NF, theta_F, target_l0=5.0)
    assert (pre_NF > scale * theta_F).sum().item() / 1000 == pytest.approx(5.0, rel=0.01)
    assert scale == pytest.approx(0.9 / 0.5, rel=0.02)  # uniform: P(pre > 0.9) = 0.1


@pytest.mark.parametrize("estimator, calibrate", [("rate", False), ("min", True)])
def test_clt_thresholds_match_each_layers_l0(estimator, calibrate):
    coder = make_coder("clt", "topk", n_latents=64, k=4).eval()
    x_NLD = torch.randn(2000, 3, 12)
    thresholds_LF, fit = fit_thresholds(coder, x_NLD, estimator, calibrate)
    assert thresholds_LF.shape == (3, 64) and (thresholds_LF > 0).all()
    converted, cfg = jumprelu_coder(coder, arch_act_cfg("clt", "topk", n_latents=64, k=4), thresholds_LF)
    l0_L = converted.encode(x_NLD).l0()
    assert l0_L.tolist() == pytest.approx(fit["source_l0"], rel=0.01)
    assert l0_L.tolist() == pytest.approx(coder.encode(x_NLD).l0().tolist(), rel=0.01)


@pytest.fixture(scope="module")
def trained(tiny_lm, tmp_path_factory):
    """Tiny TopK and BatchTopK transcoders trained long enough to be worth converting."""
    runs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention
    for name, act, norm in (("topk", "topk", []), ("batchtopk", "batchtopk", ["act.token_norm=false"]),
                            ("batchtopk_token_norm", "batchtopk", [])):  # BatchTopK's default normalises tokens
        run = tmp_path_factory.mktemp(name)
        train(tiny_cfg("transcoder", act, "train.n_tokens=8192", "train.optimizer.lr=3e-3",
                       "train.eval_every=1000", "train.checkpoint_every=1000", *norm), run, model=tiny_lm)
        runs[name] = run / "checkpoint"
    torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("act, estimator, calibrate", [
    ("topk", "rate", False), ("topk", "min", True), ("batchtopk", "rate", False), ("batchtopk_token_norm", "rate", False)])
def test_conversion_matches_l0_within_a_few_percent_nmse(trained, tiny_lm, tmp_path, act, estimator, calibrate,
                                                         one_thread):
    out = tmp_path / "jumprelu"
    report, = convert(convert_cfg(f"checkpoint={trained[act]}", f"out={out}", f"estimator={estimator}",
                                  f"calibrate={str(calibrate).lower()}"), model=tiny_lm)
    before, after = report["before"], report["after"]
    assert after["l0"] == pytest.approx(before["l0"], rel=0.05)
    assert after["nmse"] <= 1.05 * before["nmse"]
    assert before["nmse"] < 0.9  # the source learned something
    coder = load_dictionary(out)
    assert isinstance(coder.activation, JumpReLU)
    assert coder.activation.token_norm == load_dictionary(trained[act]).activation.token_norm
    cfg, meta = read_config(out)
    assert cfg.act._target_.endswith("JumpReLU") and meta["act"] == "jumprelu"
    assert meta["converted_from"]["source"] == str(trained[act])
    source_weights = load_dictionary(trained[act]).state_dict()
    for name, tensor in coder.state_dict().items():
        if not name.startswith("activation."):
            torch.testing.assert_close(tensor, source_weights[name])


def test_reloaded_conversion_reproduces_its_report(trained, tiny_lm, tmp_path):
    out = tmp_path / "jumprelu"
    report, = convert(convert_cfg(f"checkpoint={trained['topk']}", f"out={out}"), model=tiny_lm)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["eval"]["nmse"] == pytest.approx(report["after"]["nmse"])
    # On the training-style held-out set the converted coder also matches the source's L0.
    cfg, _ = read_config(trained["topk"])
    _, _, (x, y), _ = setup(cfg, tiny_lm)
    src, conv = (evaluate_coder(load_dictionary(p), x, y, 128) for p in (trained["topk"], out))
    assert conv["l0"] == pytest.approx(src["l0"], rel=0.1)


def test_a_set_converts_from_one_lm_pass_as_each_would_alone(trained, tiny_lm, tmp_path, one_thread):
    """A transcoder per layer (layers 0 and 1 here): one held-out stream of both layers, each fitted
    on its own slice, so each gets exactly the thresholds a conversion on its own gives it."""
    layer0 = tmp_path / "layer0"
    train(tiny_cfg("transcoder", "topk", "arch.layers=[0]", "train.n_tokens=4096"), layer0, model=tiny_lm)
    alone = [convert(convert_cfg(f"checkpoint={ckpt}", f"out={tmp_path / name}"), model=tiny_lm)[0]
             for name, ckpt in (("alone0", layer0 / "checkpoint"), ("alone1", trained["topk"]))]
    together = convert(convert_cfg(f"checkpoints=[{layer0 / 'checkpoint'},{trained['topk']}]"), model=tiny_lm)
    for one, both in zip(alone, together):
        assert both["fit"] == one["fit"] and both["after"] == one["after"]
        torch.testing.assert_close(load_dictionary(both["out"]).state_dict(), load_dictionary(one["out"]).state_dict(),
                                   rtol=0, atol=0)
    assert together[1]["out"] == str(trained["topk"]) + "_jumprelu"
    with pytest.raises(UsageError, match="out= names one converted checkpoint"):
        convert(convert_cfg(f"checkpoints=[{layer0 / 'checkpoint'},{trained['topk']}]", f"out={tmp_path / 'x'}"),
                model=tiny_lm)


def test_bad_input_fails_with_the_fix(trained, tiny_lm, tmp_path):
    out = tmp_path / "jumprelu"
    with pytest.raises(UsageError, match="only to=jumprelu"):
        convert(convert_cfg(f"checkpoint={trained['topk']}", "to=relu"), model=tiny_lm)
    with pytest.raises(UsageError, match="not a checkpoint"):
        convert(convert_cfg(f"checkpoint={tmp_path}"), model=tiny_lm)
    convert(convert_cfg(f"checkpoint={trained['topk']}", f"out={out}"), model=tiny_lm)
    with pytest.raises(UsageError, match="act=jumprelu; convert works on topk/batchtopk"):
        convert(convert_cfg(f"checkpoint={out}", f"out={tmp_path / 'again'}"), model=tiny_lm)
    before = (out / "dictionary.safetensors").read_bytes()
    with pytest.raises(UsageError, match="overwrite=true"):
        convert(convert_cfg(f"checkpoint={trained['topk']}", f"out={out}"), model=tiny_lm)
    assert (out / "dictionary.safetensors").read_bytes() == before


def test_cli_bad_checkpoint_is_one_line(tmp_path):
    proc = run_cli("nn_decomp.convert", f"checkpoint={tmp_path / 'nope'}", "to=jumprelu")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'nope'} is not a checkpoint")
