import pytest
from transformer_lens import HookedTransformer, HookedTransformerConfig

from helpers import tiny_lm_with_tokenizer


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
    return tiny_lm_with_tokenizer()
