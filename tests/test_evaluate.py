"""Evaluation: each metric against hand-computed values; CE loss recovered is 1 for an exact
dictionary (the model's own MLPs as ReLU transcoders, see test_patching) and 0 for one whose
reconstruction is the ablation; the all-layers replacement of exact dictionaries is the clean
model; eval.json is written once, and bad input fails with the fix."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import CONF, arch_act_cfg
from nn_decomp.core.activations import Latents
from nn_decomp.runtime.checkpoint import build_coder, save_checkpoint
from nn_decomp.analysis.evaluation import DENSITY_PNG, EVAL_JSON, evaluate, mean_activations
from nn_decomp.analysis.metrics import (DownstreamStats, ReconstructionStats, ce_recovered, clustered_stderr,
                                        paired_difference)
from nn_decomp.config import UsageError
from nn_decomp.data.heldout import excluded_token_ids, heldout_contexts
from nn_decomp.dictionaries import HookedDictionary
from test_patching import mlp_clt, mlp_transcoder, relu_lm

REPO = Path(__file__).resolve().parents[1]
SMALL_EVAL = ["device=cpu", "eval.n_tokens=256", "eval.batch_contexts=8"]


def eval_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("evaluate", overrides=[*SMALL_EVAL, *overrides])


@pytest.fixture(scope="module")
def lm():
    """The ReLU model of test_patching with SmolLM2's tokenizer, so held-out text runs through it."""
    from transformers import AutoTokenizer

    from nn_decomp.models import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    model = relu_lm(d_vocab=len(tokenizer))
    model.set_tokenizer(tokenizer)
    return model


def save(d: HookedDictionary, path: Path, *overrides: str) -> Path:
    """A hand-built dictionary as a checkpoint (data.context_size fits the tiny model's n_ctx)."""
    arch = "crosscoder" if d.coder.crosscoder else "clt" if d.coder.cross_layer else \
        "molt" if d.coder.transforms is not None else "transcoder"
    layers = f"arch.layers=[{','.join(map(str, d.layers))}]"
    cfg = arch_act_cfg(arch, "relu", layers, "data.context_size=32", *overrides, n_latents=d.coder.n_latents)
    meta = {"model": "relu_lm", "arch": arch, "act": "relu", "layers": d.layers, "hooks_in": d.hooks_in,
            "hooks_out": d.hooks_out, "d_in": d.coder.d_in, "d_out": d.coder.d_out, "n_latents": d.coder.n_latents}
    save_checkpoint(path, d.coder, cfg, meta)
    return path


# --- metrics on hand-computed values ---------------------------------------------------------

def test_reconstruction_metrics_on_hand_computed_values():
    stats = ReconstructionStats(n_layers=1, n_sources=1, n_latents=3, d_out=2, device="cpu")
    y = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]])
    recon = torch.tensor([[[1.0, 1.0]], [[0.0, 1.0]]])
    latents = Latents(torch.tensor([[[1.0, 0.0, 0.0]], [[3.0, 2.0, 0.0]]]), None, 3)
    stats.update(y, recon, latents)
    m = stats.metrics(dense_threshold=0.6)
    # residual r = [[1, −1], [0, 1]]: Σr² = 3 over 2 tokens × 2 dims; ȳ = [1, 1], Σ‖y−ȳ‖² = 4.
    assert m["mse"] == [pytest.approx(3 / 4)]
    assert m["nmse"] == [pytest.approx(3 / 4)]
    # r̄ = [0.5, 0]: Σ‖r−r̄‖² = 1.25 + 1.25 = 2.5, so explained variance = 1 − 2.5/4.
    assert m["explained_variance"] == [pytest.approx(0.375)]
    assert m["cosine"] == [pytest.approx((1 / math.sqrt(2) + 1) / 2)]
    # Latents fire 1 and 2 times per token; latent 0 on 2/2 tokens, latent 1 on 1/2, latent 2 never.
    assert m["l0"] == [pytest.approx(1.5)]
    assert m["dead_fraction"] == [pytest.approx(1 / 3)]
    assert m["dense_fraction"] == [pytest.approx(1 / 3)]  # only density 1 > 0.6


def test_downstream_stats_on_hand_computed_values():
    stats = DownstreamStats(n_contexts=2)
    logp_clean = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]]).log()
    logp = torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]]).log()
    targets, context = torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1])
    stats.add_clean(logp_clean, targets, context)
    stats.add("splice", logp_clean, logp, targets, context)
    kl0 = 0.6 * math.log(0.6 / 0.25) + 0.4 * math.log(0.4 / 0.75)  # the other two tokens: KL 0
    assert stats.mean("clean", "ce") == pytest.approx(-(math.log(0.6) + math.log(0.5) + math.log(0.9)) / 3)
    assert stats.mean("splice", "ce") == pytest.approx((math.log(4) - math.log(0.5) - math.log(0.9)) / 3)
    assert stats.mean("splice", "kl") == pytest.approx(kl0 / 3)
    assert stats.mean("splice", "top1_agreement") == pytest.approx(2 / 3)
    # clusters: context 0 holds KL sum kl0 over 1 token, context 1 sum 0 over 2; mean m = kl0 / 3;
    # residuals kl0 − m·1 = 2m, 0 − m·2 = −2m; SE = √(2/1 · 8m²) / 3 = 4m / 3
    assert stats.stderr("splice", "kl") == pytest.approx(4 * kl0 / 9)
    assert ce_recovered(ce_clean=2.0, ce_patched=3.0, ce_ablated=4.0) == 0.5


def test_clustered_stderr_is_the_plain_stderr_for_one_token_per_context():
    values = torch.tensor([1.0, 3.0, 2.0, 6.0], dtype=torch.float64)
    # the ratio estimator with n_c = 1 is the sample mean; C/(C−1)·Σr²/C² = sample variance / C
    assert clustered_stderr(values, torch.ones(4, dtype=torch.float64)) == pytest.approx(values.std().item() / 2)
    assert math.isnan(clustered_stderr(values[:1], torch.ones(1, dtype=torch.float64)))


def test_paired_difference_cancels_what_both_models_share():
    base = {"n_scored_tokens": [2, 2, 2], "ce_clean": [1.0, 2.0, 3.0]}
    a = {"per_context": base | {"replacement_kl": [1.0, 5.0, 9.0]}}
    b = {"per_context": base | {"replacement_kl": [0.8, 4.8, 8.8]}}  # a constant 0.2 per context worse
    diff, se = paired_difference(a, b, "replacement_kl")
    assert diff == pytest.approx(0.6 / 6) and se == pytest.approx(0, abs=1e-12)
    other = {"per_context": base | {"ce_clean": [1.0, 2.0, 4.0], "replacement_kl": [0.8, 4.8, 8.8]}}
    with pytest.raises(UsageError, match="different tokens"):
        paired_difference(a, other, "replacement_kl")


# --- exact and useless dictionaries ------------------------------------------------------------

def test_exact_transcoder_recovers_all_the_loss(lm, tmp_path):
    path = save(mlp_transcoder(lm, 1), tmp_path / "exact")
    result = evaluate(eval_cfg(f"checkpoint={path}"), model=lm)
    assert result["nmse"] < 1e-8 and result["explained_variance"] == pytest.approx(1, abs=1e-6)
    assert result["cosine"] == pytest.approx(1, abs=1e-6)
    assert result["ce_spliced"] == pytest.approx(result["ce_clean"], abs=1e-5)
    assert result["ce_recovered_zero"] == pytest.approx(1, abs=1e-4)
    assert result["ce_recovered_mean"] == pytest.approx(1, abs=1e-4)
    assert result["kl_spliced"] == pytest.approx(0, abs=1e-6)
    assert result["replacement_top1_agreement"] == 1.0
    assert result["l0"] == pytest.approx(result["l0_per_layer"][0])
    assert "centred" in result["nmse_definition"]
    assert result["n_tokens"] > 200 and result["n_scored_tokens"] < result["n_contexts"] * 32


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_dictionary_reconstructing_the_ablation_recovers_nothing(lm, tmp_path, ablation):
    d = mlp_transcoder(lm, 1)
    with torch.no_grad():
        d.coder.W_dec[0].zero_()
        if ablation == "mean":  # the very mean the evaluator ablates to
            cfg = arch_act_cfg("transcoder", "relu", "data.context_size=32")
            contexts = heldout_contexts(cfg, lm.tokenizer, 256)
            means = mean_activations(lm, contexts, d.hooks_out, excluded_token_ids(lm.tokenizer), 8)
            d.coder.b_dec.copy_(means[d.hooks_out[0]][None])
        else:
            d.coder.b_dec.zero_()
    path = save(d, tmp_path / ablation)
    result = evaluate(eval_cfg(f"checkpoint={path}"), model=lm)
    assert result[f"ce_recovered_{ablation}"] == pytest.approx(0, abs=1e-6)
    assert result[f"ce_{ablation}_ablated"] == pytest.approx(result["ce_spliced"], abs=1e-6)
    assert result["ce_spliced"] > result["ce_clean"]


def test_replacement_by_exact_transcoder_set_or_clt_is_the_clean_model(lm, tmp_path):
    paths = [save(mlp_transcoder(lm, layer), tmp_path / f"layer{layer}") for layer in (2, 0, 1)]
    result = evaluate(eval_cfg(f"checkpoints=[{','.join(map(str, paths))}]", f"out={tmp_path / 'set'}"), model=lm)
    assert result["layers"] == [0, 1, 2] and result["arch"] == "transcoder_set"
    clt = evaluate(eval_cfg(f"checkpoint={save(mlp_clt(lm), tmp_path / 'clt')}"), model=lm)
    for r in (result, clt):
        assert r["replacement_ce"] == pytest.approx(r["ce_clean"], abs=1e-5)
        assert r["replacement_kl"] == pytest.approx(0, abs=1e-6)
        assert r["replacement_top1_agreement"] == 1.0
        assert r["replacement_ce_recovered_zero"] == pytest.approx(1, abs=1e-4)
        assert r["ce_recovered_mean_per_layer"] == pytest.approx([1, 1, 1], abs=1e-4)
        assert len(r["nmse_per_layer"]) == len(r["l0_per_layer"]) == 3


def test_clt_with_cross_layer_writes_is_scored_per_layer_and_as_a_whole(lm, tmp_path):
    path = save(mlp_clt(lm, cross_scale=0.02), tmp_path / "clt")
    result = evaluate(eval_cfg(f"checkpoint={path}"), model=lm)
    assert result["nmse_per_layer"][0] < 1e-8 < result["nmse_per_layer"][2]  # layer 0 has no earlier source
    assert result["kl_spliced_per_layer"][0] < 1e-6 < result["replacement_kl"]
    assert result["replacement_top1_agreement"] < 1
    # cost: every parameter; the decoder's; what the active latents' writes use per token (a latent of
    # source i writes L − i vectors of d_out)
    coder = mlp_clt(lm, cross_scale=0.02).coder
    L, d_out = coder.n_layers, coder.d_out
    assert result["parameters"] == sum(p.numel() for p in coder.parameters())
    assert result["decoder_parameters"] == sum(w.numel() for w in coder.W_dec)
    assert result["active_decoder_parameters"] == pytest.approx(
        sum(l0 * (L - i) * d_out for i, l0 in enumerate(result["l0_per_layer"])))
    # per-context sums add up to the means; against the exact CLT on the same tokens (KL 0 in every
    # context) the paired difference is this CLT's KL, with this CLT's standard error
    pc = result["per_context"]
    n_C = torch.tensor(pc["n_scored_tokens"], dtype=torch.float64)
    assert len(n_C) == result["n_contexts"] and n_C.sum() == result["n_scored_tokens"]
    assert sum(pc["replacement_kl"]) / n_C.sum().item() == pytest.approx(result["replacement_kl"])
    assert 0 < result["replacement_kl_stderr"] < result["replacement_kl"]
    exact = evaluate(eval_cfg(f"checkpoint={save(mlp_clt(lm), tmp_path / 'exact')}"), model=lm)
    diff, se = paired_difference(result, exact, "replacement_kl")
    assert diff == pytest.approx(result["replacement_kl"], abs=1e-6)
    assert se == pytest.approx(result["replacement_kl_stderr"], rel=1e-3)
    # eval.per_layer=false: the same replacement on the same tokens, without the per-layer splices
    alone = evaluate(eval_cfg(f"checkpoint={path}", "eval.per_layer=false", f"out={tmp_path / 'alone'}"), model=lm)
    assert "kl_spliced_per_layer" not in alone and "ce_spliced" not in alone
    for key in ("replacement_ce", "replacement_kl", "replacement_ce_recovered_mean", "replacement_kl_stderr"):
        assert alone[key] == pytest.approx(result[key], rel=1e-6)


def test_exact_crosscoder_is_scored_per_layer_and_replaces_the_stream_exactly(lm, tmp_path):
    # latents ±x over the 3 stacked residual streams: ReLU(x) − ReLU(−x) = x at every layer
    L, D = 3, 32
    cfg = arch_act_cfg("crosscoder", "relu", n_latents=2 * L * D, n_layers=L)
    coder = build_coder(cfg, D, D).eval()
    eye = torch.eye(L * D)
    with torch.no_grad():
        coder.W_enc.copy_(torch.cat([eye, -eye])[None])
        coder.b_enc.zero_()
        coder.b_dec.zero_()
        coder.W_dec[0].copy_(torch.cat([eye, -eye]).view(-1, L, D))
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(L)]
    path = save(HookedDictionary(coder, hooks, hooks, list(range(L)), "relu_lm"), tmp_path / "cc")
    r = evaluate(eval_cfg(f"checkpoint={path}"), model=lm)
    assert r["nmse_per_layer"] == pytest.approx([0, 0, 0], abs=1e-10) and len(r["l0_per_layer"]) == 1
    assert r["replacement_ce"] == pytest.approx(r["ce_clean"], abs=1e-5)
    assert r["ce_recovered_zero_per_layer"] == pytest.approx([1, 1, 1], abs=1e-4)
    # each token's L0 is its 96 non-zero coordinates; every active latent writes 3 vectors of 32
    assert r["l0"] == pytest.approx(L * D, abs=0.5)
    assert r["active_decoder_parameters"] == pytest.approx(r["l0"] * L * D)


def test_molt_costs_count_only_the_active_transforms(lm, tmp_path):
    # Gates that do not depend on x (W_enc = 0): the rank-4 transforms always on, the rank-2 ones off.
    cfg = arch_act_cfg("molt", "relu", "arch.layers=[1]", n_latents=6)
    coder = build_coder(cfg, 32, 32).eval()
    ranks = coder.transforms.rank
    assert ranks.tolist() == [4, 4, 2, 2, 2, 2]
    with torch.no_grad():
        coder.W_enc.zero_()
        coder.b_enc.copy_(torch.where(ranks == 4, 1.0, -1.0)[None])
    d = HookedDictionary(coder, ["blocks.1.ln2.hook_normalized"], ["blocks.1.hook_mlp_out"], [1], "relu_lm")
    r = evaluate(eval_cfg(f"checkpoint={save(d, tmp_path / 'molt', 'arch.molt_ranks=[4,2]')}"), model=lm)
    assert r["l0"] == 2 and r["dead_fraction"] == pytest.approx(4 / 6)
    assert r["active_decoder_parameters"] == 2 * 4 * (32 + 32)
    assert r["decoder_parameters"] == coder.transforms.V.numel() + coder.transforms.U.numel()


# --- outputs and bad input -----------------------------------------------------------------------

def test_writes_eval_json_and_histogram_once(lm, tmp_path):
    path = save(mlp_transcoder(lm, 0), tmp_path / "ckpt")
    result = evaluate(eval_cfg(f"checkpoint={path}"), model=lm)
    written = json.loads((path / EVAL_JSON).read_text())
    assert written == json.loads(json.dumps(result))
    assert (path / DENSITY_PNG).stat().st_size > 1000
    with pytest.raises(UsageError, match="overwrite=true"):
        evaluate(eval_cfg(f"checkpoint={path}"), model=lm)
    assert json.loads((path / EVAL_JSON).read_text()) == written  # untouched
    evaluate(eval_cfg(f"checkpoint={path}", "overwrite=true", "eval.downstream=false"), model=lm)
    assert "ce_clean" not in json.loads((path / EVAL_JSON).read_text())


def test_bad_input_fails_with_the_fix(lm, tmp_path):
    with pytest.raises(UsageError, match="not a checkpoint"):
        evaluate(eval_cfg(f"checkpoint={tmp_path / 'missing'}"), model=lm)
    path = save(mlp_transcoder(lm, 1), tmp_path / "ckpt")
    with pytest.raises(UsageError, match="trained on model 'relu_lm', not 'gpt2'"):
        evaluate(eval_cfg(f"checkpoint={path}", "model=gpt2"), model=lm)
    from nn_decomp.models import tiny_model

    wider = tiny_model(n_layers=3, d_model=64, d_vocab=lm.cfg.d_vocab)
    with pytest.raises(UsageError, match="width 32"):
        evaluate(eval_cfg(f"checkpoint={path}"), model=wider)
    shallow = tiny_model(n_layers=1, d_vocab=lm.cfg.d_vocab)
    with pytest.raises(UsageError, match="trained on another model"):
        evaluate(eval_cfg(f"checkpoint={path}"), model=shallow)
    with pytest.raises(UsageError, match="written by two dictionaries"):
        evaluate(eval_cfg(f"checkpoints=[{path},{path}]", f"out={tmp_path}"), model=lm)
    assert not (tmp_path / EVAL_JSON).exists()


def run_cli(module: str, *overrides: str) -> subprocess.CompletedProcess:
    env = os.environ | {"HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)


def test_cli_bad_input_is_one_line_naming_the_fix(tmp_path):
    proc = run_cli("nn_decomp.evaluate", f"checkpoint={tmp_path}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path} is not a checkpoint")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_evaluates_a_smollm2_checkpoint_end_to_end(tmp_path):
    train = ["model.first_n_layers=2", "arch.layers=[1]", "arch.n_latents=512", "train.batch_size=128",
             "train.n_tokens=5120", "data.buffer_tokens=4096", "train.eval_tokens=1024", "train.eval_every=100",
             "model.device=cpu", f"hydra.run.dir={tmp_path}"]
    subprocess.run([sys.executable, "-m", "nn_decomp.train", *train], cwd=REPO, check=True, capture_output=True,
                   timeout=1200)
    proc = run_cli("nn_decomp.evaluate", f"checkpoint={tmp_path / 'checkpoint'}", "eval.n_tokens=512", "device=cpu")
    assert proc.returncode == 0, proc.stderr
    assert "CE clean" in proc.stdout and "FVU, centred" in proc.stdout
    result = json.loads((tmp_path / "checkpoint" / EVAL_JSON).read_text())
    assert 0 < result["nmse"] < 1 and 0 < result["l0"] <= 32
    assert result["ce_clean"] < result["ce_spliced"] < result["ce_zero_ablated"]
    assert 0 < result["ce_recovered_zero"] <= 1 and result["kl_spliced"] > 0
    assert result["hooks_out"] == ["blocks.1.hook_mlp_out"] and result["n_tokens"] > 450
    proc = run_cli("nn_decomp.evaluate", f"checkpoint={tmp_path / 'checkpoint'}", "model=gpt2", "device=cpu")
    assert proc.returncode == 1 and "trained on model 'smollm2_135m'" in proc.stderr
