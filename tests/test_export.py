"""Export to SAELens and circuit-tracer, and SAELens import.

SAELens (installed with the dev extra) loads every export and must encode/decode like our coder; an
import of SAELens files gives back the same coder. circuit-tracer 0.5.0 pins transformers<=4.57.3,
which conflicts with our transformers 5.x, so it is not installed: its files are checked against the
shapes its loaders read (circuit_tracer/transcoder/{cross_layer,single_layer}_transcoder.py) and
against a re-implementation of its forward pass; the loader test runs only where it is importable."""
import importlib.util
import json
import os

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from helpers import CONF, arch_act_cfg, make_coder
from nn_decomp.checkpoint import load_dictionary, save_checkpoint
from nn_decomp.config import arch_hooks
from nn_decomp.evaluate import UsageError, evaluate
from nn_decomp.export import SAELENS_CFG, SAELENS_WEIGHTS, export, import_saelens
from test_evaluate import eval_cfg, lm, run_cli, save  # noqa: F401  (lm: fixture)
from test_patching import mlp_transcoder

HAS_SAELENS = importlib.util.find_spec("sae_lens") is not None
HAS_CIRCUIT_TRACER = importlib.util.find_spec("circuit_tracer") is not None
needs_saelens = pytest.mark.skipif(not HAS_SAELENS, reason="sae_lens not installed (pip install -e '.[dev]')")
SAELENS_PAIRS = [("sae", "relu"), ("sae", "topk"), ("sae", "jumprelu"), ("sae", "batchtopk"),
                 ("transcoder", "relu"), ("transcoder", "jumprelu"), ("transcoder", "batchtopk"),
                 ("skip_transcoder", "relu"), ("skip_transcoder", "jumprelu")]


def export_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("export", overrides=list(overrides))


def random_checkpoint(path, arch: str, act: str, *overrides: str, seed: int = 0):
    """A checkpoint of random weights (biases, W_skip and thresholds included) on 12-dim hooks. A
    BatchTopK transcoder does not normalise tokens: SAELens and circuit-tracer take none."""
    if act == "batchtopk" and arch != "sae" and not any(o.startswith("act.token_norm") for o in overrides):
        overrides = (*overrides, "act.token_norm=false")
    cfg = arch_act_cfg(arch, act, *overrides, n_latents=64, k=4)
    act_overrides = tuple(o for o in overrides if o.startswith("act."))
    coder = make_coder(arch, act, seed=seed, overrides=act_overrides, n_latents=64, k=4).eval()  # layer-independent shapes
    with torch.no_grad():
        if act == "batchtopk":
            coder.activation.threshold.uniform_(0.0, 0.4)
        if act == "jumprelu":
            coder.activation.log_threshold.uniform_(-3, -1)
    hooks_in, hooks_out = arch_hooks(cfg.arch)
    meta = {"model": "tiny", "arch": arch, "act": act, "layers": list(cfg.arch.layers), "hooks_in": hooks_in,
            "hooks_out": hooks_out, "d_in": coder.d_in, "d_out": coder.d_out, "n_latents": coder.n_latents}
    save_checkpoint(path, coder, cfg, meta)
    return path, coder


# --- SAELens ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, act", SAELENS_PAIRS)
def test_saelens_export_has_the_documented_layout(tmp_path, arch, act):
    ckpt, coder = random_checkpoint(tmp_path / "ckpt", arch, act)
    out = export(export_cfg(f"checkpoint={ckpt}", "format=saelens", f"out={tmp_path / 'sl'}"))
    cfg = json.loads((out / SAELENS_CFG).read_text())
    w = load_file(out / SAELENS_WEIGHTS)
    assert cfg["apply_b_dec_to_input"] is False  # BatchTopK normalises each token (act.token_norm):
    assert cfg["normalize_activations"] == ("constant_norm_rescale" if (arch, act) == ("sae", "batchtopk") else "none")
    assert cfg["metadata"]["sae_lens_version"] >= "6.0.0" and cfg["metadata"]["hook_name"] == "blocks.2." + (
        "hook_resid_post" if arch == "sae" else "ln2.hook_normalized")
    assert w["W_enc"].shape == (12, 64) and w["W_dec"].shape == (64, 12) and w["b_dec"].shape == (12,)
    assert ("threshold" in w) == (act in ("jumprelu", "batchtopk"))
    assert ("W_skip" in w) == (arch == "skip_transcoder")
    if arch != "sae":
        assert cfg["d_out"] == 12 and cfg["metadata"]["hook_name_out"] == "blocks.2.hook_mlp_out"
    mask = os.umask(0)
    os.umask(mask)
    for f in [*out.iterdir(), *ckpt.iterdir()]:  # others may read what the umask lets them (not 0600)
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


@needs_saelens
@pytest.mark.parametrize("arch, act", SAELENS_PAIRS)
def test_saelens_loads_the_export_and_computes_what_we_do(tmp_path, arch, act):
    from sae_lens import SAE

    ckpt, coder = random_checkpoint(tmp_path / "ckpt", arch, act)
    out = export(export_cfg(f"checkpoint={ckpt}", "format=saelens", f"out={tmp_path / 'sl'}"))
    sae = SAE.load_from_disk(out)
    x_ND = torch.randn(50, 12)
    ours = coder(x_ND[:, None])
    feats = sae.encode(x_ND)
    torch.testing.assert_close(feats, ours.latents.dense()[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x_ND), ours.recon[:, 0], atol=1e-5, rtol=1e-5)


@needs_saelens
def test_sae_made_by_saelens_imports_with_b_dec_subtraction_folded(tmp_path):
    from sae_lens import SAE, StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=12, d_sae=64, apply_b_dec_to_input=True))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    sae.cfg.metadata.model_name = "tiny"
    sae.save_model(tmp_path / "sl")
    out = import_saelens(tmp_path / "sl", tmp_path / "ours")
    x_ND = torch.randn(50, 12)
    reloaded = SAE.load_from_disk(tmp_path / "sl")
    torch.testing.assert_close(load_dictionary(out)(x_ND[:, None]).recon[:, 0], reloaded(x_ND), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch, act", SAELENS_PAIRS)
def test_saelens_round_trip_gives_back_the_same_coder(tmp_path, arch, act):
    # our JumpReLU has no token normalisation to import constant_norm_rescale into
    no_norm = ["act.token_norm=false"] if act == "batchtopk" else []
    ckpt, coder = random_checkpoint(tmp_path / "ckpt", arch, act, *no_norm)
    export(export_cfg(f"checkpoint={ckpt}", "format=saelens", f"out={tmp_path / 'sl'}"))
    back = export(export_cfg(f"from_saelens={tmp_path / 'sl'}", f"out={tmp_path / 'back'}"))
    reloaded = load_dictionary(back)
    x_NLD = torch.randn(50, 1, 12)
    torch.testing.assert_close(reloaded(x_NLD).recon, coder(x_NLD).recon, atol=1e-6, rtol=1e-6)
    meta = json.loads((back / "metadata.json").read_text())
    assert meta["hooks_in"] == json.loads((ckpt / "metadata.json").read_text())["hooks_in"]
    assert meta["act"] == ("jumprelu" if act == "batchtopk" else act)


def test_imported_saelens_transcoder_is_scored_by_our_evaluator(lm, tmp_path):  # noqa: F811
    ckpt = save(mlp_transcoder(lm, 1), tmp_path / "exact")
    export(export_cfg(f"checkpoint={ckpt}", "format=saelens", f"out={tmp_path / 'sl'}"))
    imported = import_saelens(tmp_path / "sl", tmp_path / "imported")
    with pytest.raises(UsageError, match="eval.context_size=64"):  # imports get our default 128
        evaluate(eval_cfg(f"checkpoint={imported}"), model=lm)
    result = evaluate(eval_cfg(f"checkpoint={imported}", "eval.context_size=64"), model=lm)
    assert result["ce_recovered_zero"] == pytest.approx(1, abs=1e-4) and result["nmse"] < 1e-8


# --- circuit-tracer ----------------------------------------------------------------------------

def circuit_tracer_forward(out, n_layers: int, x_LND: torch.Tensor, clt: bool) -> torch.Tensor:
    """circuit-tracer 0.5.0's computation on its files: features = x @ W_enc.T + b_enc, then
    x·(x > θ) (ReLU without θ); a CLT sums W_dec_i[:, j − i] over sources i ≤ j; a transcoder adds
    x @ W_skip.T."""
    recon = []
    for j in range(n_layers):
        if clt:
            total = load_file(out / f"W_enc_{j}.safetensors")[f"b_dec_{j}"].clone()
            for i in range(j + 1):
                enc = load_file(out / f"W_enc_{i}.safetensors")
                pre = torch.einsum("nd,fd->nf", x_LND[i], enc[f"W_enc_{i}"]) + enc[f"b_enc_{i}"]
                acts = pre * (pre > enc[f"threshold_{i}"]) if f"threshold_{i}" in enc else torch.relu(pre)
                total = total + acts @ load_file(out / f"W_dec_{i}.safetensors")[f"W_dec_{i}"][:, j - i]
        else:
            w = load_file(out / f"layer_{j}.safetensors")
            pre = x_LND[j] @ w["W_enc"].T + w["b_enc"]
            theta = w.get("activation_function.threshold")
            acts = torch.relu(pre) if theta is None else pre * (pre > theta)
            total = acts @ w["W_dec"] + w["b_dec"]
            if "W_skip" in w:
                total = total + x_LND[j] @ w["W_skip"].T
        recon.append(total)
    return torch.stack(recon, 1)


@pytest.mark.parametrize("act", ["relu", "jumprelu", "batchtopk"])
def test_circuit_tracer_clt_files_match_its_loader_layout_and_forward(tmp_path, act):
    ckpt, coder = random_checkpoint(tmp_path / "ckpt", "clt", act)
    out = export(export_cfg(f"checkpoint={ckpt}", "format=circuit_tracer", f"out={tmp_path / 'ct'}"))
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("ln2.hook_normalized", "hook_mlp_out")
    for i in range(3):
        enc, dec = load_file(out / f"W_enc_{i}.safetensors"), load_file(out / f"W_dec_{i}.safetensors")
        assert enc[f"W_enc_{i}"].shape == (64, 12) and enc[f"b_enc_{i}"].shape == (64,)
        assert enc[f"b_dec_{i}"].shape == (12,) and dec[f"W_dec_{i}"].shape == (64, 3 - i, 12)
        assert (f"threshold_{i}" in enc) == (act != "relu")
    x_NLD = torch.randn(40, 3, 12)
    torch.testing.assert_close(circuit_tracer_forward(out, 3, x_NLD.transpose(0, 1), clt=True),
                               coder(x_NLD).recon, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch, act", [("transcoder", "jumprelu"), ("skip_transcoder", "relu")])
def test_circuit_tracer_transcoder_set_files_match_its_loader_layout_and_forward(tmp_path, arch, act):
    made = [random_checkpoint(tmp_path / f"l{i}", arch, act, f"arch.layers=[{i}]", seed=i) for i in (2, 0, 1)]
    paths = ",".join(str(p) for p, _ in made)
    out = export(export_cfg(f"checkpoints=[{paths}]", "format=circuit_tracer", f"out={tmp_path / 'ct'}"))
    assert yaml.safe_load((out / "config.yaml").read_text())["model_kind"] == "transcoder_set"
    coders = {i: c for i, (_, c) in zip((2, 0, 1), made)}
    for i in range(3):
        w = load_file(out / f"layer_{i}.safetensors")
        assert w["W_enc"].shape == w["W_dec"].shape == (64, 12)
        assert ("activation_function.threshold" in w) == (act == "jumprelu")
        assert ("W_skip" in w) == (arch == "skip_transcoder")
    x_LND = torch.randn(3, 40, 12)
    expected = torch.stack([coders[i](x_LND[i][:, None]).recon[:, 0] for i in range(3)], 1)
    torch.testing.assert_close(circuit_tracer_forward(out, 3, x_LND, clt=False), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_CIRCUIT_TRACER, reason="circuit-tracer 0.5.0 needs transformers<=4.57.3 (we use 5.x)")
def test_circuit_tracer_loads_the_clt(tmp_path):
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    ckpt, coder = random_checkpoint(tmp_path / "ckpt", "clt", "jumprelu")
    out = export(export_cfg(f"checkpoint={ckpt}", "format=circuit_tracer", f"out={tmp_path / 'ct'}"))
    clt = load_clt(str(out), "ln2.hook_normalized", "hook_mlp_out", device=torch.device("cpu"),
                   dtype=torch.float32, lazy_decoder=False)
    x_NLD = torch.randn(40, 3, 12)
    features = clt.encode(x_NLD.transpose(0, 1))
    ours = coder(x_NLD)
    torch.testing.assert_close(features, ours.latents.dense().transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clt.decode(features.to_sparse()), ours.recon.transpose(0, 1), atol=1e-5, rtol=1e-5)


# --- formats that cannot represent the dictionary, and overwriting ---------------------------------

@pytest.mark.parametrize("arch, act, fmt, message", [
    ("transcoder", "topk", "saelens", "python -m nn_decomp.convert checkpoint=.* to=jumprelu"),
    ("clt", "jumprelu", "saelens", "use format=circuit_tracer"),
    ("clt", "topk", "circuit_tracer", "python -m nn_decomp.convert checkpoint=.* to=jumprelu"),
    ("sae", "relu", "circuit_tracer", "format=saelens"),
    ("transcoder", "relu", "circuit_tracer", r"layers 0\.\.2 \(these cover \[2\]\)"),
    ("clt", "batchtopk", "circuit_tracer", "retrain with act.token_norm=false"),
    ("transcoder", "batchtopk", "saelens", "trained with act.token_norm=false"),
])
def test_unrepresentable_export_fails_naming_the_fix(tmp_path, arch, act, fmt, message):
    ckpt, _ = random_checkpoint(tmp_path / "ckpt", arch, act, *["act.token_norm=true"] * (act == "batchtopk"))
    with pytest.raises(UsageError, match=message):
        export(export_cfg(f"checkpoint={ckpt}", f"format={fmt}", f"out={tmp_path / 'out'}"))
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    ckpt, _ = random_checkpoint(tmp_path / "ckpt", "transcoder", "relu")
    out = tmp_path / "sl"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="overwrite=true"):
        export(export_cfg(f"checkpoint={ckpt}", "format=saelens", f"out={out}"))
    assert (out / "notes.txt").read_text() == "mine"
    export(export_cfg(f"checkpoint={ckpt}", "format=saelens", f"out={out}", "overwrite=true"))
    assert (out / SAELENS_CFG).exists() and not (out / "notes.txt").exists()
    assert not out.with_name("sl.tmp").exists() and not out.with_name("sl.old").exists()
    with pytest.raises(UsageError, match="overwrite=true"):
        import_saelens(out, ckpt)
    with pytest.raises(UsageError, match="not a SAELens SAE dir"):
        import_saelens(tmp_path, tmp_path / "x")
    with pytest.raises(UsageError, match="pass out=DIR"):
        export(export_cfg(f"checkpoint={ckpt}", "format=saelens"))
    with pytest.raises(UsageError, match="format=onnx"):
        export(export_cfg(f"checkpoint={ckpt}", "format=onnx", f"out={tmp_path / 'o'}"))


def test_cli_refusal_is_one_line_naming_the_conversion(tmp_path):
    ckpt, _ = random_checkpoint(tmp_path / "ckpt", "transcoder", "topk")
    proc = run_cli("nn_decomp.export", f"checkpoint={ckpt}", "format=saelens", f"out={tmp_path / 'sl'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: SAELens cannot represent arch=transcoder with act=topk: convert it first: "
        f"python -m nn_decomp.convert checkpoint={ckpt} to=jumprelu, then export the converted checkpoint")
