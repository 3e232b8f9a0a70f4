"""Patching dictionaries into a forward pass: per-layer encoding equals the coder's, an exact
dictionary leaves the model unchanged, the replacement model encodes each layer from the patched
stream, and ablations replace only the positions asked for.

The exact dictionaries are the MLPs themselves: in a ReLU model, the MLP of layer l is a ReLU
transcoder from ln2.hook_normalized to hook_mlp_out with W_enc = diag(ln2.w)·W_in,
b_enc = ln2.b·W_in + b_in, W_dec = W_out, b_dec = b_out (latents = its d_mlp neurons)."""
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from helpers import ACTS, make_coder
from nn_decomp.core.activations import ReLU
from nn_decomp.core.coder import SparseCoder
from nn_decomp.analysis.patching import patched, replacement_model
from nn_decomp.dictionaries import HookedDictionary

HOOK_IN, HOOK_OUT = "blocks.{}.ln2.hook_normalized", "blocks.{}.hook_mlp_out"


def relu_lm(d_vocab: int = 100, n_ctx: int = 64, seed: int = 0) -> HookedTransformer:
    """3-layer ReLU-MLP model with random biases and LayerNorm weights (all terms exercised)."""
    cfg = HookedTransformerConfig(n_layers=3, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=d_vocab,
                                  n_ctx=n_ctx, act_fn="relu", normalization_type="LN", seed=seed)
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("b_in", "b_out", "ln2.b")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("ln2.w"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def mlp_weights(model: HookedTransformer, layer: int):
    """(W_enc [D, H], b_enc [H], W_dec [H, D], b_dec [D]) reproducing block `layer`'s MLP exactly."""
    ln, mlp = model.blocks[layer].ln2, model.blocks[layer].mlp
    return ln.w[:, None] * mlp.W_in, ln.b @ mlp.W_in + mlp.b_in, mlp.W_out, mlp.b_out


@torch.no_grad()
def mlp_transcoder(model: HookedTransformer, layer: int) -> HookedDictionary:
    W_enc, b_enc, W_dec, b_dec = mlp_weights(model, layer)
    coder = SparseCoder(model.cfg.d_model, model.cfg.d_model, model.cfg.d_mlp, 1, ReLU(0.0)).eval()
    coder.W_enc.copy_(W_enc.T[None])
    coder.b_enc.copy_(b_enc[None])
    coder.W_dec[0].copy_(W_dec[:, None])
    coder.b_dec.copy_(b_dec[None])
    return HookedDictionary(coder, [HOOK_IN.format(layer)], [HOOK_OUT.format(layer)], [layer], "relu_lm")


@torch.no_grad()
def mlp_clt(model: HookedTransformer, cross_scale: float = 0.0, seed: int = 0) -> HookedDictionary:
    """A CLT over every layer whose same-layer decoders are the MLPs; cross-layer decoders are
    `cross_scale`·random (0: exact)."""
    L, D, H = model.cfg.n_layers, model.cfg.d_model, model.cfg.d_mlp
    coder = SparseCoder(D, D, H, L, ReLU(0.0), cross_layer=True).eval()
    g = torch.Generator().manual_seed(seed)
    for i in range(L):
        W_enc, b_enc, W_dec, b_dec = mlp_weights(model, i)
        coder.W_enc[i].copy_(W_enc.T)
        coder.b_enc[i].copy_(b_enc)
        coder.b_dec[i].copy_(b_dec)
        coder.W_dec[i].copy_(cross_scale * torch.randn(coder.W_dec[i].shape, generator=g))
        coder.W_dec[i][:, 0] = W_dec
    return HookedDictionary(coder, [HOOK_IN.format(i) for i in range(L)], [HOOK_OUT.format(i) for i in range(L)],
                            list(range(L)), "relu_lm")


@pytest.fixture(scope="module")
def model():
    return relu_lm()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))


def record(model, tokens, names, fwd_hooks_ctx=None):
    """Activations at `names` in one forward (inside whatever patch context is active)."""
    seen = {}

    def save(act, hook):
        seen[hook.name] = act.detach().clone()

    with model.hooks(fwd_hooks=[(n, save) for n in names]):
        logits = model(tokens)
    return logits, seen


@pytest.mark.parametrize("act", ACTS)
def test_encode_layer_equals_the_coders_encoding(act):
    coder = make_coder("clt", act, d_in=12, d_out=12, n_latents=64).eval()
    if act == "batchtopk":  # eval mode uses the estimated threshold
        coder.activation.threshold.uniform_(0, 0.3)
    x_NLD = torch.randn(20, 3, 12)
    reference = coder.encode(x_NLD).dense()
    for i in range(3):
        torch.testing.assert_close(coder.encode_layer(x_NLD[:, i], i).dense()[:, 0], reference[:, i])


@torch.no_grad()
def test_exact_dictionaries_leave_the_model_unchanged(model, tokens):
    clean = model(tokens)
    for layer in range(3):
        with patched(model, mlp_transcoder(model, layer)):
            torch.testing.assert_close(model(tokens), clean, atol=1e-4, rtol=1e-4)
    with replacement_model(model, [mlp_transcoder(model, layer) for layer in range(3)]):
        torch.testing.assert_close(model(tokens), clean, atol=1e-4, rtol=1e-4)
    with replacement_model(model, mlp_clt(model)):
        torch.testing.assert_close(model(tokens), clean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model(tokens), clean)  # hooks removed on exit


@torch.no_grad()
def test_a_wrong_dictionary_changes_the_output_and_only_its_own_layer(model, tokens):
    wrong = mlp_transcoder(model, 1)
    shift_D = torch.randn(32, generator=torch.Generator().manual_seed(3))  # not constant: LN would remove that
    wrong.coder.b_dec.add_(shift_D)
    names = [HOOK_OUT.format(i) for i in range(3)]
    _, clean = record(model, tokens, names)
    with patched(model, wrong):
        _, spliced = record(model, tokens, names)
    torch.testing.assert_close(spliced[names[0]], clean[names[0]])
    torch.testing.assert_close(spliced[names[1]], clean[names[1]] + shift_D, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(spliced[names[2]], clean[names[2]], atol=1e-3)


@torch.no_grad()
def test_each_transcoder_of_a_set_writes_its_own_layer(model, tokens):
    """Built in a loop: a late-binding closure would give every layer the last transcoder."""
    names = [HOOK_OUT.format(i) for i in range(3)]
    _, clean = record(model, tokens, names)
    shifted = []
    for layer in range(3):
        d = mlp_transcoder(model, layer)
        d.coder.b_dec.add_(0.01 * (layer + 1) * torch.arange(32.0))
        shifted.append(d)
    with patched(model, shifted, layers=[0]):  # only layer 0 is replaced: the rest is clean
        _, out = record(model, tokens, names)
    torch.testing.assert_close(out[names[0]], clean[names[0]] + 0.01 * torch.arange(32.0), atol=1e-4, rtol=1e-4)
    with replacement_model(model, shifted):
        _, out = record(model, tokens, names)
    # Each output is its own MLP (on the patched stream) plus its own shift.
    for layer in range(3):
        d = mlp_transcoder(model, layer)
        _, x = record_with(model, tokens, shifted, HOOK_IN.format(layer))
        expected = d.coder(x.reshape(-1, 1, 32)).recon.view_as(out[names[layer]]) + 0.01 * (layer + 1) * torch.arange(32.0)
        torch.testing.assert_close(out[names[layer]], expected, atol=1e-4, rtol=1e-4)


def record_with(model, tokens, dictionaries, name):
    with replacement_model(model, dictionaries):
        logits, seen = record(model, tokens, [name])
    return logits, seen[name]


@torch.no_grad()
def test_clt_replacement_encodes_each_layer_from_the_patched_stream(model, tokens):
    clt = mlp_clt(model, cross_scale=0.05)
    ins, outs = [HOOK_IN.format(i) for i in range(3)], [HOOK_OUT.format(i) for i in range(3)]
    with replacement_model(model, clt):
        _, seen = record(model, tokens, ins + outs)
    # Reference: the coder's own forward on the inputs this patched pass produced.
    x_NLD = torch.stack([seen[h] for h in ins], 2).reshape(-1, 3, 32)
    recon_NLD = clt.coder(x_NLD).recon
    for j in range(3):
        torch.testing.assert_close(seen[outs[j]].reshape(-1, 32), recon_NLD[:, j], atol=1e-4, rtol=1e-4)
    # Not teacher-forced: the clean run's inputs give different outputs from layer 1 on.
    _, clean = record(model, tokens, ins)
    teacher = clt.coder(torch.stack([clean[h] for h in ins], 2).reshape(-1, 3, 32)).recon
    torch.testing.assert_close(teacher[:, 0], recon_NLD[:, 0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(teacher[:, 2], recon_NLD[:, 2], atol=1e-3)


VARIANTS = [("transcoder", ()), ("skip_transcoder", ()), ("molt", ()), ("clt", ()), ("clt", ("arch.skip=true",)),
            ("clt", ("arch.decoder_tying=per_source", "arch.per_target_scale=true")),
            ("clt", ("arch.decoder_tying=per_target",)), ("clt", ("arch.feature_offset=true", "arch.feature_scale=true")),
            ("transcoder", ("act.token_norm=true",)), ("clt", ("act.token_norm=true",))]


@torch.no_grad()
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("arch,overrides", VARIANTS)
def test_replacement_model_writes_what_the_coders_forward_gives(model, tokens, arch, overrides, act):
    """Patching has no decode of its own: in the replacement model every hook_out gets exactly
    coder(x).recon of the inputs that same patched pass produced (core/coder.py encode_layer /
    decode_layer vs forward), for every architecture, tying, feature offset / scale, token
    normalisation and activation."""
    L = 3 if arch == "clt" else 1
    coder = make_coder(arch, act, d_in=32, d_out=32, n_latents=64, n_layers=3, overrides=overrides).eval()
    if act == "batchtopk":  # eval mode uses the estimated threshold
        coder.activation.threshold.uniform_(0, 0.3)
    for p in (coder.feature_offset, coder.feature_scale):
        if p is not None:
            p.add_(0.1 * torch.randn(p.shape))
    if coder.W_dec_scale is not None:
        coder.W_dec_scale.uniform_(0.5, 1.5)
    layers = list(range(L)) if arch == "clt" else [1]
    ins, outs = [HOOK_IN.format(i) for i in layers], [HOOK_OUT.format(i) for i in layers]
    with replacement_model(model, HookedDictionary(coder, ins, outs, layers, "relu_lm")):
        _, seen = record(model, tokens, ins + outs)
    recon_NLD = coder(torch.stack([seen[h] for h in ins], 2).reshape(-1, L, 32)).recon
    for j in range(L):
        torch.testing.assert_close(seen[outs[j]].reshape(-1, 32), recon_NLD[:, j], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_token_normalising_dictionary_write_follows_the_tokens_scale(model, tokens):
    """BatchTopK with act.token_norm encodes x·√d/‖x‖ and divides its write by the same factor of its
    target layer's input: the encoding ignores a token's scale, the write follows it."""
    coder = make_coder("clt", "batchtopk", d_in=32, d_out=32, n_latents=64, n_layers=3).eval()
    assert coder.activation.token_norm
    coder.activation.threshold.uniform_(0, 0.3)
    x_NLD = torch.randn(36, 3, 32)
    out = coder(x_NLD)
    # on every row with no pre-activation at its threshold's rounding edge (the rescaled row may round
    # across it: measured once, 1 entry in 7000)
    plain = coder(x_NLD * 3.0)
    clear_N = ((out.pre_acts - coder.activation.threshold).abs() > 1e-5).flatten(1).all(1)
    assert clear_N.float().mean() > 0.9
    torch.testing.assert_close(plain.recon[clear_N], 3.0 * out.recon[clear_N], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_clt_splice_of_one_layer_sums_every_earlier_source(model, tokens):
    clt = mlp_clt(model, cross_scale=0.05)
    ins, out = [HOOK_IN.format(i) for i in range(3)], HOOK_OUT.format(2)
    _, clean = record(model, tokens, ins)
    with patched(model, clt, layers=[2]):
        _, seen = record(model, tokens, [out])
    teacher = clt.coder(torch.stack([clean[h] for h in ins], 2).reshape(-1, 3, 32)).recon[:, 2]
    torch.testing.assert_close(seen[out].reshape(-1, 32), teacher, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("act", ACTS)
def test_crosscoder_splice_writes_its_reconstruction_of_the_clean_pass(model, tokens, act):
    """Acausal: each layer's write depends on later layers too, so the splice encodes a clean pass's
    activations, and every covered layer (or those in `layers`) gets that reconstruction."""
    coder = make_coder("crosscoder", act, d_in=32, d_out=32, n_latents=64, n_layers=3).eval()
    if act == "batchtopk":
        coder.activation.threshold.uniform_(0, 0.3)
    names = [f"blocks.{i}.hook_resid_post" for i in range(3)]
    d = HookedDictionary(coder, names, names, [0, 1, 2], "relu_lm")
    _, clean = record(model, tokens, names)
    recon_BTLD = coder(torch.stack([clean[h] for h in names], 2).reshape(-1, 3, 32)).recon.view(3, 12, 3, 32)
    with patched(model, d, clean=clean):
        _, seen = record(model, tokens, names)
    for j in range(3):
        torch.testing.assert_close(seen[names[j]], recon_BTLD[:, :, j], atol=1e-4, rtol=1e-4)
    with patched(model, d, layers=[1], clean=clean):
        _, seen = record(model, tokens, names)
    torch.testing.assert_close(seen[names[0]], clean[names[0]])
    torch.testing.assert_close(seen[names[1]], recon_BTLD[:, :, 1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="pass clean="):
        with patched(model, d):
            pass


@pytest.mark.parametrize("mode", ["zero", "mean"])
@torch.no_grad()
def test_ablation_replaces_only_the_chosen_positions(model, tokens, mode):
    d = mlp_transcoder(model, 1)
    name = HOOK_OUT.format(1)
    _, clean = record(model, tokens, [name])
    mean_D = torch.randn(32)
    positions_BT = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    with patched(model, d, mode, means={name: mean_D}, positions_BT=positions_BT):
        _, seen = record(model, tokens, [name])
    value = mean_D if mode == "mean" else torch.zeros(32)
    torch.testing.assert_close(seen[name][positions_BT], value.expand(int(positions_BT.sum()), -1))
    torch.testing.assert_close(seen[name][~positions_BT], clean[name][~positions_BT])


@torch.no_grad()
def test_sae_is_read_before_it_is_replaced(model, tokens):
    """hook_in == hook_out: the reconstruction is computed from the clean activation at that hook."""
    D = 32
    coder = SparseCoder(D, D, 8, 1, ReLU(0.0), skip=True).eval()
    coder.W_dec[0].zero_()
    coder.W_skip.copy_(2 * torch.eye(D)[None])  # recon = 2x
    name = "blocks.1.hook_resid_post"
    d = HookedDictionary(coder, [name], [name], [1], "relu_lm")
    _, clean = record(model, tokens, [name])
    with patched(model, d):
        _, seen = record(model, tokens, [name])
    torch.testing.assert_close(seen[name], 2 * clean[name])


def test_mean_mode_without_means_names_the_fix(model, tokens):
    with pytest.raises(ValueError, match="means"):
        with patched(model, mlp_transcoder(model, 0), "mean"):
            pass
