import pytest
from transformer_lens import HookedTransformer, HookedTransformerConfig


@pytest.fixture
def tiny_model() -> HookedTransformer:
    """A 3-layer random model: fast on CPU, with every hook a real model has."""
    cfg = HookedTransformerConfig(n_layers=3, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=100,
                                  n_ctx=64, act_fn="gelu", normalization_type="LN", seed=0)
    return HookedTransformer(cfg)


@pytest.fixture(scope="session")
def tiny_lm() -> HookedTransformer:
    """A 3-layer random model with SmolLM2's real tokenizer, so the whole text → tokens →
    activations path runs as in production, in seconds."""
    from transformers import AutoTokenizer

    from nn_decomp.models import smollm2_dir, tiny_model

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    model = tiny_model(n_layers=3, d_model=32, d_mlp=64, d_vocab=len(tokenizer), n_ctx=64)
    model.set_tokenizer(tokenizer)
    return model
