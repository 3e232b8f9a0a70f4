"""SparseCoder invariants over every architecture × activation: shapes, gradients, training steps,
decoder norms, the CLT's causal structure, sparse vs dense decoding, and folding the scales."""
import copy

import pytest
import torch
from omegaconf import OmegaConf

from helpers import ACTS, ARCHS, MULTI_LAYER, arch_act_cfg, make_coder, one_thread  # noqa: F401
from nn_decomp.core.activations import Latents
from nn_decomp.runtime.checkpoint import build_coder, unit_norm_decoder
from nn_decomp.core.losses import coder_loss
from nn_decomp.runtime.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN, D_OUT, F, L_CLT = 12, 10, 64, 3


def dims(arch: str) -> tuple[int, int, int]:
    """(d_in, d_out, n_layers): an SAE reconstructs its input; transcoders map 12 → 10 dims."""
    return D_IN, D_IN if arch in ("sae", "crosscoder") else D_OUT, L_CLT if arch in MULTI_LAYER else 1


def n_sources(arch: str) -> int:
    """Latent groups: one per layer, a crosscoder's one shared by its layers."""
    return 1 if arch == "crosscoder" else dims(arch)[2]


def decoder_names(arch: str) -> set[str]:
    return {"transforms.U", "transforms.V"} if arch == "molt" else {f"W_dec.{i}" for i in range(n_sources(arch))}


def batch(arch: str, n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x and a learnable target: x itself for an SAE, else a fixed random linear map of x."""
    d_in, d_out, L = dims(arch)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, d_in, generator=g)
    if arch in ("sae", "crosscoder"):
        return x, x
    A = torch.randn(L, d_in, d_out, generator=g) / d_in ** 0.5
    return x, torch.einsum("bld,lde->ble", x, A)


def fresh_coder(arch: str, act: str, *overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    d_in, d_out, _ = dims(arch)
    # θ well inside the random pre-activations' range, so every JumpReLU term has a gradient.
    threshold = ["act.init_threshold=0.1"] if act == "jumprelu" else []
    cfg = arch_act_cfg(arch, act, *threshold, *overrides, n_latents=F, n_layers=L_CLT)
    return cfg, build_coder(cfg, d_in, d_out)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes(arch, act):
    d_in, d_out, L = dims(arch)
    coder = make_coder(arch, act, d_in=d_in, d_out=d_out, n_latents=F, n_layers=L_CLT)
    x, _ = batch(arch, n=8)
    out = coder(x)
    S = n_sources(arch)
    assert out.pre_acts.shape == (8, S, F)
    assert out.recon.shape == (8, L, d_out)
    assert out.latents.dense().shape == (8, S, F)
    assert out.latents.n_latents == F
    # a latent of source i writes targets i..L−1 (a crosscoder's one source: every layer); a MOLT has none
    assert [tuple(w.shape) for w in coder.W_dec] == [(F, L - i, d_out) for i in range(S)] * (arch != "molt")
    assert out.latents.indices is not None  # every activation's default path is the sparse one


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_is_finite_and_every_parameter_gets_a_gradient(arch, act):
    _, coder = fresh_coder(arch, act)
    if arch == "skip_transcoder":
        assert (coder.W_skip == 0).all()  # zero at init ...
    x, y = batch(arch)
    all_dead = torch.ones(n_sources(arch), F, dtype=torch.bool)  # exercise AuxK too
    losses = coder_loss(coder, coder(x), y, all_dead)
    for term in losses[:4]:
        assert torch.isfinite(term)
    assert (losses.aux > 0) == (act in ("topk", "batchtopk"))
    losses.loss.backward()
    names = dict(coder.named_parameters())
    expected = {"W_enc", "b_enc", "b_dec"} | decoder_names(arch)
    expected |= {"W_skip"} if arch == "skip_transcoder" else set()  # ... but it learns
    expected |= {"activation.log_threshold"} if act == "jumprelu" else set()
    assert set(names) == expected
    for name, p in names.items():
        assert p.grad is not None and (p.grad != 0).any(), f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_trainer_steps_decrease_the_loss_on_a_fixed_batch(arch, act):
    cfg, coder = fresh_coder(arch, act, "train.warmup_steps=5", "train.optimizer.lr=3e-3")
    _, _, L = dims(arch)
    x, y = batch(arch, n=64)
    trainer = Trainer(cfg, coder, total_steps=60, scale_in_L=torch.ones(L), scale_out_L=torch.ones(L))

    def loss_now() -> float:
        with torch.no_grad():
            return coder_loss(coder, coder(x), y, None).loss.item()

    before = loss_now()
    for _ in range(60):
        trainer.train_step(x, y)
    assert trainer.step == 60 and trainer.tokens_seen == 60 * 64
    assert loss_now() < 0.8 * before
    if coder.activation.unit_norm_decoder and arch != "molt":  # a MOLT's maps have no norm to fix
        concatenated = torch.stack([w.flatten(1).norm(dim=1) for w in coder.W_dec])
        torch.testing.assert_close(concatenated.detach(), torch.ones(n_sources(arch), F))


@pytest.mark.parametrize("arch, setting, unit", [
    ("sae", "null", True), ("crosscoder", "null", True), ("transcoder", "null", False),
    ("skip_transcoder", "null", False), ("clt", "null", False), ("transcoder", "true", True), ("sae", "false", False)])
def test_decoder_norm_is_held_at_one_for_autoencoders_and_free_for_transcoders(arch, setting, unit):
    cfg, coder = fresh_coder(arch, "topk", f"arch.unit_norm_decoder={setting}", "train.optimizer.lr=3e-2")
    _, _, L = dims(arch)
    trainer = Trainer(cfg, coder, total_steps=5, scale_in_L=torch.ones(L), scale_out_L=torch.ones(L))
    norms = lambda: torch.stack([w.flatten(1).norm(dim=1) for w in coder.W_dec]).detach()  # noqa: E731
    start = torch.full((n_sources(arch), F), 1.0 if unit else cfg.arch.dec_init_norm)
    torch.testing.assert_close(norms(), start)
    for _ in range(5):
        trainer.train_step(*batch(arch, n=64))
    assert coder.activation.unit_norm_decoder == unit
    if unit:
        torch.testing.assert_close(norms(), start)
    else:
        assert (norms() - start).abs().max() > 1e-2


@pytest.mark.parametrize("act", ["relu", "jumprelu"])
def test_token_norm_makes_elementwise_activations_blind_to_a_token_s_scale(act):
    # act.token_norm: each token is encoded at norm √d_in, so a loud copy of a token fires the same
    # latents (a fixed per-latent threshold means the same for every token) and is written back loud.
    x, _ = batch("sae", n=16)
    scale = torch.linspace(0.2, 5.0, 16)[:, None, None]
    loud = x * scale  # token i at 0.2 … 5 times its norm
    _, plain = fresh_coder("sae", act, "act.token_norm=false")
    _, normed = fresh_coder("sae", act, "act.token_norm=true")
    assert normed.activation.token_norm and not plain.activation.token_norm
    with torch.no_grad():
        for coder in (plain, normed):  # a threshold > 0 (ReLU's is −b_enc): scale decides what passes it
            coder.b_enc.fill_(-0.3)
        a, b = normed(x), normed(loud)
        torch.testing.assert_close(b.latents.dense(), a.latents.dense())
        torch.testing.assert_close(b.recon, a.recon * scale)  # the write divided by the token's own scale
        assert (a.latents.dense() != 0).any()
        assert ((plain(x).latents.dense() != 0) != (plain(loud).latents.dense() != 0)).any()


def test_sparsity_warmup_weighs_the_penalty_linearly_from_zero_to_one():
    cfg, coder = fresh_coder("sae", "relu", "train.sparsity_warmup_steps=3")
    trainer = Trainer(cfg, coder, total_steps=6, scale_in_L=torch.ones(1), scale_out_L=torch.ones(1))
    x, y = batch("sae", n=64)
    weights = []
    for _ in range(6):
        weights.append(trainer.sparsity_weight())
        trainer.train_step(x, y)
    assert weights == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    out = coder(x)
    full, half = coder_loss(coder, out, y, None), coder_loss(coder, out, y, None, sparsity_weight=0.5)
    assert full.sparsity.item() > 0 and half.sparsity.item() == full.sparsity.item()  # reported unweighted
    assert half.loss.item() == pytest.approx(full.recon.item() + 0.5 * full.sparsity.item())


def test_trainer_anneals_relus_penalty_exponent_by_the_fraction_of_training_done():
    cfg, coder = fresh_coder("sae", "relu", "act.p_end=0.5", "act.anneal_start=0.5")
    trainer = Trainer(cfg, coder, total_steps=4, scale_in_L=torch.ones(1), scale_out_L=torch.ones(1))
    x, y = batch("sae", n=64)
    for step, p in enumerate([1.0, 1.0, 1.0, 0.75]):  # p falls from 1 at step 2 of 4 to 0.5 at the end
        with torch.no_grad():
            out = coder(x)
            latents = out.latents.dense() * coder.decoder_norm()
            expected = cfg.act.l1_coef * latents.pow(p).sum((-1, -2)).mean()  # 0^p = 0: zeros add nothing
        assert trainer.train_step(x, y).sparsity.item() == pytest.approx(expected.item(), rel=1e-5), step


def test_a_checkpoint_older_than_unit_norm_decoder_keeps_what_it_was_trained_with():
    cfg, _ = fresh_coder("transcoder", "topk")
    arch = OmegaConf.masked_copy(cfg.arch, [k for k in cfg.arch if k != "unit_norm_decoder"])
    assert unit_norm_decoder(arch, True) and not unit_norm_decoder(cfg.arch, True)
    assert not unit_norm_decoder(arch, False)


@pytest.mark.parametrize("arch, setting, normed", [
    ("sae", "null", True), ("crosscoder", "null", True), ("transcoder", "null", False), ("skip_transcoder", "null", False),
    ("clt", "null", False), ("molt", "null", False), ("transcoder", "true", True), ("sae", "false", False)])
def test_jumprelu_normalises_tokens_for_autoencoders_only(arch, setting, normed):
    cfg, coder = fresh_coder(arch, "jumprelu", f"act.token_norm={setting}")
    assert coder.activation.token_norm is normed
    assert (coder.token_scale(batch(arch, n=4)[0]) is not None) == normed
    # a checkpoint written before the key (a JumpReLU that never normalised) stays as it was trained
    act = OmegaConf.masked_copy(cfg.act, [k for k in cfg.act if k != "token_norm"])
    assert build_coder(OmegaConf.merge(cfg, {"act": None}, {"act": act}), *dims(arch)[:2]).activation.token_norm is False


def test_parallel_decoder_gradient_is_projected_out():
    """Each latent's decoder gradient loses exactly its component along the latent's (concatenated)
    decoder vector: g − (g·w / w·w) w, checked row by row against the formula."""
    coder = make_coder("clt", "topk", d_in=D_IN, d_out=D_OUT, n_latents=F, n_layers=L_CLT)
    with torch.no_grad():
        for w in coder.W_dec:
            w.mul_(torch.rand(F, 1, 1) + 0.5)  # norms other than 1: the division must be there
            w.grad = torch.randn_like(w)
    before = [w.grad.clone() for w in coder.W_dec]
    coder.remove_parallel_decoder_grad()
    for w, g in zip(coder.W_dec, before):
        w_FX, g_FX = w.detach().flatten(1), g.flatten(1)
        want = torch.stack([gr - (gr @ wr) / (wr @ wr) * wr for gr, wr in zip(g_FX, w_FX)])
        torch.testing.assert_close(w.grad.flatten(1), want)
        assert (w.grad.flatten(1) * w_FX).sum(1).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_relu_decoder_norms_are_free(arch):
    cfg, coder = fresh_coder(arch, "relu", "train.warmup_steps=1")
    _, _, L = dims(arch)
    norms = coder.decoder_norm()
    if arch == "crosscoder":  # concatenated norm 0.1; decoder_norm=sum adds the 3 layers' (≈ 0.1/√3 each)
        torch.testing.assert_close(norms, torch.full((1, F), 0.1 * 3 ** 0.5), rtol=0.2, atol=0)
    else:  # arch.dec_init_norm (a MOLT's: ‖U_t V_tᵀ‖_F)
        torch.testing.assert_close(norms, torch.full((n_sources(arch), F), 0.1))
    x, y = batch(arch)
    trainer = Trainer(cfg, coder, total_steps=10, scale_in_L=torch.ones(L), scale_out_L=torch.ones(L))
    for _ in range(10):
        trainer.train_step(x, y)
    norms = coder.decoder_norm()
    assert not torch.allclose(norms, torch.full_like(norms, 0.1)) and (norms < 0.5).all()


def assert_input_at_layer_i_changes_only_layers_from_i_on(coder, bitwise: bool) -> None:
    """Perturb the input of each layer i: targets < i stay as they were (bitwise, or up to float
    rounding), every target ≥ i moves."""
    x, _ = batch("clt", n=16)
    base = coder(x).recon
    for i in range(L_CLT):
        x2 = x.clone()
        x2[:, i] += 3 * torch.randn_like(x2[:, i])
        diff = coder(x2).recon - base
        if bitwise:
            assert (diff[:, :i] == 0).all(), f"input at layer {i} changed an earlier layer"
        else:
            torch.testing.assert_close(diff[:, :i], torch.zeros_like(diff[:, :i]), atol=1e-5, rtol=0)
        assert (diff[:, i:].abs().amax((0, 2)) > 1e-3).all(), f"input at layer {i} changed nothing downstream"


@pytest.mark.parametrize("act", ACTS)
def test_clt_input_at_layer_i_changes_only_layers_from_i_on(act):
    coder = make_coder("clt", act, d_in=D_IN, d_out=D_OUT, n_latents=F, n_layers=L_CLT)
    # all but TopK: same latents, but the padded width K follows the busiest row of any layer, so
    # the embedding_bag sums in another order: equal up to float rounding
    assert_input_at_layer_i_changes_only_layers_from_i_on(coder, bitwise=act == "topk")


def test_clt_latents_at_layer_i_write_only_to_layers_from_i_on():
    coder = make_coder("clt", "relu", d_in=D_IN, d_out=D_OUT, n_latents=F, n_layers=L_CLT)
    values = torch.relu(torch.randn(4, L_CLT, F))
    base = coder.decode(Latents(values, None, F))
    for i in range(L_CLT):
        bumped = values.clone()
        bumped[:, i, :5] += 1.0
        diff = coder.decode(Latents(bumped, None, F)) - base
        assert (diff[:, :i] == 0).all()
        # the change at layer j is exactly Σ_f Δf · W_dec[i][f, j − i]
        expected = coder.W_dec[i][:5].sum(0).detach()  # [L − i, D]
        torch.testing.assert_close(diff[:, i:].detach(), expected.expand(4, -1, -1))


def test_clt_decoder_has_no_weight_for_earlier_layers():
    coder = make_coder("clt", "relu", d_in=D_IN, d_out=D_OUT, n_latents=F, n_layers=4)
    assert [tuple(w.shape) for w in coder.W_dec] == [(F, 4, D_OUT), (F, 3, D_OUT), (F, 2, D_OUT), (F, 1, D_OUT)]
    # the concatenated decoder norm covers exactly those targets
    expected = torch.stack([torch.cat([w[:, t] for t in range(w.shape[1])], -1).norm(dim=-1) for w in coder.W_dec])
    torch.testing.assert_close(coder.decoder_norm(), expected)


def random_sparse(B: int, L: int, K: int, seed: int = 0) -> Latents:
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(B, L, F, generator=g).argsort(-1)[..., :K]  # distinct per row
    values = torch.relu(torch.randn(B, L, K, generator=g))
    values[:, :, -1] = 0  # a padding slot, as BatchTopK produces
    return Latents(values.requires_grad_(), indices, F)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_decode_equals_dense_decode_values_and_gradients(arch, masked):
    """Same output and weight gradients. The gradient of the values too, except outside the latents'
    grad_mask (here: the non-zero values, as TopK sets it), where it is 0."""
    d_in, d_out, L = dims(arch)
    sparse = random_sparse(6, n_sources(arch), K=7)
    if masked:
        sparse = sparse._replace(grad_mask=sparse.values.detach() != 0)
    x, _ = batch(arch, n=6)
    upstream = torch.randn(6, L, d_out)
    grads = []
    for as_dense in (False, True):
        coder = make_coder(arch, "topk", d_in=d_in, d_out=d_out, n_latents=F, n_layers=L_CLT)
        sparse.values.grad = None
        latents = Latents(sparse.dense(), None, F) if as_dense else sparse
        recon = coder.decode(latents, x)
        (recon * upstream).sum().backward()
        grads.append((recon.detach(), sparse.values.grad.clone(),
                      {n: p.grad.clone() for n, p in coder.named_parameters() if p.grad is not None}))
    (r_sparse, g_sparse, p_sparse), (r_dense, g_dense, p_dense) = grads
    torch.testing.assert_close(r_sparse, r_dense)
    zero = sparse.values.detach() == 0
    assert zero.any() and (g_dense[zero] != 0).all()
    torch.testing.assert_close(g_sparse, torch.where(zero, 0.0, g_dense) if masked else g_dense)
    assert (g_sparse != 0).any()
    assert set(p_sparse) == set(p_dense) and decoder_names(arch) <= set(p_sparse)
    for name in p_sparse:
        torch.testing.assert_close(p_sparse[name], p_dense[name], msg=name)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_fold_scales_maps_raw_activations_like_the_scaled_coder(arch, act):
    d_in, d_out, L = dims(arch)
    coder = make_coder(arch, act, d_in=d_in, d_out=d_out, n_latents=F, n_layers=L_CLT)
    # a token-normalising coder (BatchTopK) scales each input itself: its input scale stays 1
    s_in = torch.ones(L) if coder.activation.token_norm else torch.tensor([0.5, 2.0, 3.0])[:L]
    s_out = torch.tensor([4.0, 0.25, 1.5])[:L] if arch != "sae" else torch.tensor([0.5, 2.0, 3.0])[:L]
    x, _ = batch(arch, n=16)
    scaled = coder(x * s_in[:, None])
    folded = copy.deepcopy(coder)
    folded.fold_scales(s_in, s_out)
    raw = folded(x)
    torch.testing.assert_close(raw.latents.dense(), scaled.latents.dense(), rtol=1e-4, atol=1e-5)
    assert (raw.latents.dense() != 0).any()
    torch.testing.assert_close(raw.recon, scaled.recon / s_out[:, None], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(raw.recon, scaled.recon, rtol=1e-2)  # the scales did matter


# --- CLT variants: tied decoders, feature offset / scale, skip ------------------------------------

CLT_VARIANTS = {
    "per_source": ["arch.decoder_tying=per_source"],
    "per_source+scale": ["arch.decoder_tying=per_source", "arch.per_target_scale=true"],
    "per_target": ["arch.decoder_tying=per_target"],
    "offset+scale+skip": ["arch.feature_offset=true", "arch.feature_scale=true", "arch.skip=true"],
    "per_target+offset+scale": ["arch.decoder_tying=per_target", "arch.feature_offset=true", "arch.feature_scale=true"],
}


def clt_variant(name: str, act: str = "relu"):
    """A CLT of that variant with every optional parameter random (so each term counts)."""
    _, coder = fresh_coder("clt", act, *CLT_VARIANTS[name])
    with torch.no_grad():
        coder.b_dec.normal_()
        for p in (coder.W_dec_scale, coder.feature_offset, coder.feature_scale, coder.W_skip):
            if p is not None:
                p.uniform_(0.5, 1.5)
    return coder


def reference_recon(coder, latents: Latents, x) -> torch.Tensor:
    """recon_j = b_dec_j + Σ_{i ≤ j} v_i @ decoders()[i][:, j − i] (+ x_j @ W_skip_j), v = feature_values."""
    v = coder.feature_values(latents).dense()
    decoders = coder.decoders()
    out = []
    for j in range(coder.n_layers):
        y = coder.b_dec[j] + sum(v[:, i] @ decoders[i][:, j - i] for i in range(j + 1))
        out.append(y if coder.W_skip is None else y + x[:, j] @ coder.W_skip[j])
    return torch.stack(out, 1)


@pytest.mark.parametrize("variant", CLT_VARIANTS)
def test_clt_variant_decodes_as_its_expanded_untied_decoders(variant):
    coder = clt_variant(variant)
    x, _ = batch("clt", n=16)
    out = coder(x)
    assert (out.latents.values != 0).any()
    torch.testing.assert_close(out.recon, reference_recon(coder, out.latents, x), rtol=1e-4, atol=1e-5)
    # decoder_norm: the norm of each latent's expanded decoder, computed without expanding
    expanded = torch.stack([w.flatten(1).norm(dim=1) for w in coder.decoders()])
    torch.testing.assert_close(coder.decoder_norm(), expanded)
    tying = coder.decoder_tying
    assert [tuple(w.shape) for w in coder.W_dec] == [(F, L_CLT - i if tying == "none" else 1, D_OUT) for i in range(L_CLT)]


@pytest.mark.parametrize("variant", CLT_VARIANTS)
def test_clt_variant_input_at_layer_i_changes_only_layers_from_i_on(variant):
    assert_input_at_layer_i_changes_only_layers_from_i_on(clt_variant(variant), bitwise=False)


@pytest.mark.parametrize("variant", CLT_VARIANTS)
def test_clt_variant_folds_scales(variant):
    coder = clt_variant(variant)
    s_in, s_out = torch.tensor([0.5, 2.0, 3.0]), torch.tensor([4.0, 0.25, 1.5])
    x, _ = batch("clt", n=16)
    scaled = coder(x * s_in[:, None])
    folded = copy.deepcopy(coder)
    folded.fold_scales(s_in, s_out)
    torch.testing.assert_close(folded(x).recon, scaled.recon / s_out[:, None], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", CLT_VARIANTS)
def test_clt_variant_parameters_and_active_decoder_cost(variant):
    coder = clt_variant(variant)
    names = {n for n, _ in coder.named_parameters()}
    assert ("W_dec_scale" in names) == ("arch.per_target_scale=true" in CLT_VARIANTS[variant])
    assert ("feature_offset" in names) == ("offset" in variant) and ("W_skip" in names) == ("skip" in variant)
    per_latent = coder.decoder_params()[:, 0].tolist()
    assert (coder.decoder_params() == coder.decoder_params()[:, :1]).all()
    if coder.decoder_tying == "per_source":
        assert per_latent == [D_OUT + (L_CLT - i) * ("scale" in variant) for i in range(L_CLT)]
    else:
        assert per_latent == [(L_CLT - i) * D_OUT for i in range(L_CLT)]
