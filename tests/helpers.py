"""Shared helpers for the unit tests: config composition, coders with known weights, and synthetic
data with planted sparse features (ground truth for the recovery tests)."""
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import nn_decomp.config  # noqa: F401  (registers the schemas in Hydra's ConfigStore)
from nn_decomp.runtime.checkpoint import build_coder
from nn_decomp.core.coder import SparseCoder
from nn_decomp.config.arch import ARCHS, MULTI_LAYER  # noqa: F401  (tests import them from here)

CONF = Path(__file__).resolve().parents[1] / "conf"
ACTS = ("relu", "topk", "batchtopk", "jumprelu")


@pytest.fixture
def one_thread():
    """Run a training-heavy test on one thread: these tensors are too small to gain from two, and on
    a shared 2-core machine competing OpenMP threads slow each step by an order of magnitude."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_lm_with_tokenizer():
    """A 3-layer random model (the same weights in every process) with SmolLM2's real tokenizer."""
    from transformers import AutoTokenizer

    from nn_decomp.models import smollm2_dir, tiny_model

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    model = tiny_model(n_layers=3, d_model=32, d_mlp=64, d_vocab=len(tokenizer), n_ctx=64)
    model.set_tokenizer(tokenizer)
    return model


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def arch_act_cfg(arch: str, act: str, *overrides: str, n_latents: int = 64, k: int = 4,
                 n_layers: int = 3) -> DictConfig:
    """A small config for `arch` × `act`: k set for the TopK family, `n_layers` layers for a CLT or
    a crosscoder, small ranks for a MOLT."""
    extra = [f"act.k={k}"] if act in ("topk", "batchtopk") else []
    if arch in MULTI_LAYER:
        extra.append(f"arch.layers=[{','.join(str(i) for i in range(n_layers))}]")
    if arch == "molt":
        extra.append("arch.molt_ranks=[4,2]")
    return compose_cfg(f"arch={arch}", f"act={act}", f"arch.n_latents={n_latents}", *extra, *overrides)


def make_coder(arch: str, act: str, d_in: int = 12, d_out: int = 12, seed: int = 0, overrides: tuple = (),
               **kwargs) -> SparseCoder:
    """A coder with every weight random and non-zero (biases and W_skip included), so each term of
    the forward pass is exercised. d_out == d_in for an SAE."""
    torch.manual_seed(seed)
    # θ well inside the random pre-activations' range (the default 3.0 would silence them).
    threshold = ["act.init_threshold=0.1"] if act == "jumprelu" else []
    cfg = arch_act_cfg(arch, act, *threshold, *overrides, **kwargs)
    coder = build_coder(cfg, d_in, d_in if arch == "sae" else d_out)
    with torch.no_grad():
        coder.b_enc.normal_(0, 0.1)
        coder.b_dec.normal_(0, 0.1)
        if coder.W_skip is not None:
            coder.W_skip.normal_(0, 0.1)
    return coder


def unit_rows(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, d, generator=generator)
    return w / w.norm(dim=-1, keepdim=True)


def max_cosine(true_ND: torch.Tensor, learned_MD: torch.Tensor) -> torch.Tensor:
    """[N]: for each true direction, the best cosine similarity with any learned row."""
    true = true_ND / true_ND.norm(dim=-1, keepdim=True)
    learned = learned_MD / learned_MD.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return (true @ learned.T).max(dim=-1).values


@dataclass
class PlantedFeatures:
    """Tokens that are sparse non-negative combinations of known unit directions.

    Each of `n_layers` source layers has `n_features` features; feature f of layer i fires with
    probability `p_fire` with a magnitude uniform in [m_lo, m_hi]·`amp`. The input at layer i is
    Σ_f z_if·enc[i, f]. The output at layer j is Σ_{i≤j} Σ_f z_if·dec[i, f, j−i] when `cross_layer`,
    else Σ_f z_jf·dec[j, f, 0] (a transcoder); an SAE reconstructs its input (`dec` unused).
    `amp` scales the data so that E‖x‖² ≈ d, the normalisation training applies (runtime/training.py)."""

    enc_LND: torch.Tensor
    dec: list[torch.Tensor]  # dec[i]: [N, L−i, D_out] unit vectors per target (or [N, 1, D_out])
    p_fire: float
    m_lo: float
    m_hi: float
    amp: float
    cross_layer: bool
    generator: torch.Generator

    @classmethod
    def make(cls, n_features: int, d_in: int, d_out: int | None = None, n_layers: int = 1,
             cross_layer: bool = False, active: float = 4.0, m_lo: float = 0.5, m_hi: float = 1.5,
             seed: int = 0, tying: str = "none") -> "PlantedFeatures":
        """tying (CLT): "per_source": feature f of layer i writes one direction to every j ≥ i;
        "per_target": features f of every layer i ≤ j write the same direction to j."""
        g = torch.Generator().manual_seed(seed)
        d_out = d_out or d_in
        enc = torch.stack([unit_rows(n_features, d_in, g) for _ in range(n_layers)])
        L = n_layers
        if tying == "per_source":
            dec = [unit_rows(n_features, d_out, g)[:, None].expand(-1, L - i, -1) for i in range(L)]
        elif tying == "per_target":
            shared = [unit_rows(n_features, d_out, g) for _ in range(L)]
            dec = [torch.stack(shared[i:], 1) for i in range(L)]
        else:
            dec = [torch.stack([unit_rows(n_features, d_out, g) for _ in range(L - i if cross_layer else 1)], 1)
                   for i in range(L)]
        mean_sq_mag = (m_hi ** 3 - m_lo ** 3) / (3 * (m_hi - m_lo))
        amp = (d_in / (active * mean_sq_mag)) ** 0.5
        return cls(enc, dec, active / n_features, m_lo, m_hi, amp, cross_layer, g)

    def codes(self, batch: int) -> torch.Tensor:
        """[B, L, N] sparse non-negative feature activations."""
        L, N, _ = self.enc_LND.shape
        u = torch.rand(batch, L, N, generator=self.generator)
        # one draw for both: fires when u < p, and then u/p is uniform on [0, 1)
        mags = self.m_lo + (self.m_hi - self.m_lo) * (u / self.p_fire)
        return self.amp * (u < self.p_fire) * mags

    def batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, D_in], y [B, L, D_out] (the planted map's output), z [B, L, N]."""
        z_BLN = self.codes(batch)
        x_BLD = torch.einsum("bln,lnd->bld", z_BLN, self.enc_LND)
        L = z_BLN.shape[1]
        y_BLD = x_BLD.new_zeros(batch, L, self.dec[0].shape[-1])
        for i, dec_NTD in enumerate(self.dec):
            write_BTD = torch.einsum("bn,ntd->btd", z_BLN[:, i], dec_NTD)
            if self.cross_layer:
                y_BLD[:, i:] += write_BTD
            else:
                y_BLD[:, i] += write_BTD[:, 0]
        return x_BLD, y_BLD, z_BLN


def forbid_loading(monkeypatch, *targets) -> None:
    """Refusals must come before any model loads or worker runs: each (module, attribute) of `targets`,
    and nn_decomp.models.load_model, fails the test if called."""
    import nn_decomp.models

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded or a worker run before the input was refused")

    for module, name in [(nn_decomp.models, "load_model"), *targets]:
        monkeypatch.setattr(module, name, loaded)
