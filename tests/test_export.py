"""Export to SAELens and circuit-tracer, and SAELens import.

SAELens (installed with the dev extra) loads every export and must encode/decode like our coder; an
import of SAELens files gives back the same coder. circuit-tracer 0.5.0 pins transformers<=4.57.3,
which conflicts with our transformers 5.x, so it is not installed: its files are checked against the
shapes its loaders read (circuit_tracer/transcoder/{cross_layer,single_layer}_transcoder.py) and
against a re-implementation of its forward pass; its own loaders and replacement model run, through
the bridge, only where its Python exists (`bash setup_env.sh --with circuit-tracer`)."""
import importlib.util
import json
import os
import re
import shlex

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from safetensors.torch import load_file, save_file

from helpers import CONF, arch_act_cfg, make_coder
from nn_decomp.runtime.checkpoint import load_dictionary, read_config, save_checkpoint
from nn_decomp.analysis.evaluation import evaluate
from nn_decomp.config import UsageError
from nn_decomp.config.arch import arch_hooks
from nn_decomp.export import export
from nn_decomp.interop.bridge import WORKERS, find_python, run_worker
from nn_decomp.interop.circuit_tracer import CIRCUIT_TRACER
from nn_decomp.dictionaries import load_dictionaries
from nn_decomp.interop.formats import export_decoders, write_dir
from nn_decomp.interop.saelens import SAELENS_CFG, SAELENS_WEIGHTS, import_saelens, saelens_files
from test_evaluate import eval_cfg, lm, run_cli, save  # noqa: F401  (lm: fixture)
from test_patching import mlp_transcoder

HAS_SAELENS = importlib.util.find_spec("sae_lens") is not None
needs_saelens = pytest.mark.skipif(not HAS_SAELENS, reason="sae_lens not installed (pip install -e '.[dev]')")
SAELENS_PAIRS = [("sae", "relu"), ("sae", "topk"), ("sae", "jumprelu"), ("sae", "batchtopk"),
                 ("transcoder", "relu"), ("transcoder", "jumprelu"), ("transcoder", "batchtopk"),
                 ("skip_transcoder", "relu"), ("skip_transcoder", "jumprelu")]


def export_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("export", overrides=list(overrides))


def random_checkpoint(path, arch: str, act: str, *overrides: str, seed: int = 0, d: int = 12, model: str = "tiny",
                      decoder_scale: float = 1.0):
    """A checkpoint of random weights (biases, W_skip and thresholds included) on d-dim hooks, decoder
    rows scaled by `decoder_scale` (as a folded input normalisation leaves them). A
    BatchTopK transcoder does not normalise tokens unless asked: SAELens and circuit-tracer have no
    token normalisation, and the random rows the tests feed are no norm's output."""
    if act == "batchtopk" and arch != "sae" and not any(o.startswith("act.token_norm") for o in overrides):
        overrides = (*overrides, "act.token_norm=false")
    cfg = arch_act_cfg(arch, act, *overrides, n_latents=64, k=4)
    coder = make_coder(arch, act, d_in=d, d_out=d, seed=seed, overrides=overrides, n_latents=64, k=4).eval()
    with torch.no_grad():
        if act == "batchtopk":
            coder.activation.threshold.uniform_(0.0, 0.4)
        if act == "jumprelu":
            coder.activation.log_threshold.uniform_(-3, -1)
        for p in (coder.W_dec_scale, coder.feature_scale):
            if p is not None:
                p.uniform_(0.5, 1.5)
        for w in coder.W_dec:
            w.mul_(decoder_scale)
    hooks_in, hooks_out = arch_hooks(cfg.arch)
    meta = {"model": model, "arch": arch, "act": act, "layers": list(cfg.arch.layers), "hooks_in": hooks_in,
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
    # BatchTopK and JumpReLU SAEs normalise each token by default (act.token_norm)
    assert cfg["normalize_activations"] == ("constant_norm_rescale" if (arch, act) in (("sae", "batchtopk"), ("sae", "jumprelu"))
                                            else "none")
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

    # a Matryoshka dictionary (training-only prefixes) and a feature scale export like any other
    extra = ["arch.matryoshka=[8,32]", "arch.feature_scale=true"] if (arch, act) == ("transcoder", "batchtopk") else []
    ckpt, coder = random_checkpoint(tmp_path / "ckpt", arch, act, *extra, decoder_scale=5.18)
    out = export(export_cfg(f"checkpoint={ckpt}", "format=saelens", f"out={tmp_path / 'sl'}"))
    sae = SAE.load_from_disk(out)
    # SAELens-based tools (SAEBench) assume unit decoder rows; the row norms move to the latents
    norms_F = torch.cat([w[:, 0] for w in export_decoders(load_dictionaries([ckpt])[0], "test")]).norm(dim=-1)
    assert not torch.allclose(norms_F, torch.ones_like(norms_F))
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-6, rtol=0)
    x_ND = torch.randn(50, 12)
    ours = coder(x_ND[:, None])
    feats = sae.encode(x_ND)
    torch.testing.assert_close(feats, ours.latents.dense()[:, 0] * norms_F, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x_ND), ours.recon[:, 0], atol=1e-5, rtol=1e-5)


@needs_saelens
@pytest.mark.parametrize("act", ["relu", "batchtopk"])
def test_a_clt_layer_as_a_saelens_transcoder_encodes_its_latents_in_units_of_all_they_write(tmp_path, act):
    """SAEBench's encoder-side evals read a CLT layer by layer: layer i's latents, each scaled by the
    norm of its decoder rows to every later layer together."""
    from sae_lens import SAE

    ckpt, coder = random_checkpoint(tmp_path / "ckpt", "clt", act, "arch.decoder_tying=per_source",
                                    "arch.per_target_scale=true", decoder_scale=5.18)
    d = load_dictionaries([ckpt])[0]
    cfg, meta = read_config(ckpt)
    x_NLD = torch.randn(50, 3, 12)
    with torch.no_grad():
        latents_NLF = coder(x_NLD).latents.dense()
    for i, W_dec_FTD in enumerate(export_decoders(d, "test")):
        out = write_dir(tmp_path / f"layer{i}", saelens_files(d, meta, cfg, clt_layer=i), overwrite=False)
        sae = SAE.load_from_disk(out)
        assert sae.cfg.metadata.hook_name == f"blocks.{i}.ln2.hook_normalized"
        norms_F = W_dec_FTD.flatten(1).norm(dim=-1)
        torch.testing.assert_close(sae.encode(x_NLD[:, i]), latents_NLF[:, i] * norms_F, atol=1e-5, rtol=1e-5)
        own_rows_F = sae.W_dec.norm(dim=-1)  # the l→l share of everything the latent writes
        torch.testing.assert_close(own_rows_F, W_dec_FTD[:, 0].norm(dim=-1) / norms_F)
        assert (own_rows_F < 1 - 1e-3).all() if i < 2 else torch.allclose(own_rows_F, torch.ones(64))


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
    # constant_norm_rescale (a BatchTopK or JumpReLU SAE's default token_norm) comes back as act.token_norm
    ckpt, coder = random_checkpoint(tmp_path / "ckpt", arch, act)
    export(export_cfg(f"checkpoint={ckpt}", "format=saelens", f"out={tmp_path / 'sl'}"))
    back = export(export_cfg(f"from_saelens={tmp_path / 'sl'}", f"out={tmp_path / 'back'}"))
    reloaded = load_dictionary(back)
    x_NLD = torch.randn(50, 1, 12)
    torch.testing.assert_close(reloaded(x_NLD).recon, coder(x_NLD).recon, atol=1e-6, rtol=1e-6)
    meta = json.loads((back / "metadata.json").read_text())
    assert meta["hooks_in"] == json.loads((ckpt / "metadata.json").read_text())["hooks_in"]
    assert meta["act"] == ("jumprelu" if act == "batchtopk" else act)
    assert reloaded.activation.token_norm == coder.activation.token_norm == ((arch, act) in (("sae", "batchtopk"),
                                                                                         ("sae", "jumprelu")))


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


@pytest.mark.parametrize("variant", [["arch.decoder_tying=per_source", "arch.per_target_scale=true"],
                                     ["arch.decoder_tying=per_target", "arch.feature_scale=true"]])
def test_tied_clt_exports_expanded_to_circuit_tracers_untied_layout(tmp_path, variant):
    """circuit-tracer has untied CLTs only: tying and feature scales are expanded exactly."""
    ckpt, coder = random_checkpoint(tmp_path / "ckpt", "clt", "jumprelu", *variant)
    out = export(export_cfg(f"checkpoint={ckpt}", "format=circuit_tracer", f"out={tmp_path / 'ct'}"))
    assert [load_file(out / f"W_dec_{i}.safetensors")[f"W_dec_{i}"].shape for i in range(3)] == \
        [(64, 3 - i, 12) for i in range(3)]
    x_NLD = torch.randn(40, 3, 12)
    with torch.no_grad():
        expected = coder(x_NLD).recon
    torch.testing.assert_close(circuit_tracer_forward(out, 3, x_NLD.transpose(0, 1), clt=True), expected,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("override, message", [("arch.feature_offset=true", "no per-feature offset"),
                                               ("arch.skip=true", "reads no skip weights")])
def test_clt_parts_circuit_tracer_lacks_are_refused(tmp_path, override, message):
    ckpt, _ = random_checkpoint(tmp_path / "ckpt", "clt", "relu", override)
    with pytest.raises(UsageError, match=message):
        export(export_cfg(f"checkpoint={ckpt}", "format=circuit_tracer", f"out={tmp_path / 'ct'}"))


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


def fake_hf_model(path, n_layers: int, d: int = 12, arch: str = "LlamaForCausalLM"):
    """A Hugging Face folder with only what folding reads: config.json and the MLP-input norm weights."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": [arch], "num_hidden_layers": n_layers}))
    norm_LD = torch.rand(n_layers, d) + 0.5
    save_file({f"model.layers.{i}.post_attention_layernorm.weight": norm_LD[i] for i in range(n_layers)},
              path / "model.safetensors")
    return path, norm_LD


@pytest.mark.parametrize("arch, act", [("clt", "jumprelu"), ("skip_transcoder", "relu")])
def test_folded_export_reads_the_normed_mlp_input_as_we_read_the_unnormed_one(tmp_path, arch, act):
    """hf_model= folds the RMSNorm weight w into the encoder (and W_skip): circuit-tracer then feeds
    w ⊙ x (its nnsight `mlp.hook_in`) and must compute what our coder computes on x."""
    hf, norm_LD = fake_hf_model(tmp_path / "hf", 3)
    if arch == "clt":
        ckpt, coder = random_checkpoint(tmp_path / "ckpt", arch, act)
        checkpoints, coders = f"checkpoint={ckpt}", None
    else:
        made = [random_checkpoint(tmp_path / f"l{i}", arch, act, f"arch.layers=[{i}]", seed=i) for i in range(3)]
        checkpoints, coders = f"checkpoints=[{','.join(str(p) for p, _ in made)}]", [c for _, c in made]
    out = export(export_cfg(checkpoints, "format=circuit_tracer", f"out={tmp_path / 'ct'}", f"hf_model={hf}"))
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "hook_mlp_out")
    x_LND = torch.randn(3, 40, 12)
    with torch.no_grad():
        expected = coder(x_LND.transpose(0, 1)).recon if coders is None else \
            torch.stack([coders[i](x_LND[i][:, None]).recon[:, 0] for i in range(3)], 1)
    got = circuit_tracer_forward(out, 3, x_LND * norm_LD[:, None], clt=arch == "clt")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    unfolded = circuit_tracer_forward(out, 3, x_LND, clt=arch == "clt")
    assert (unfolded - expected).abs().max() > 0.1  # the fold is not a no-op


def test_config_names_the_hub_model_and_a_settable_scan(tmp_path):
    ckpt, _ = random_checkpoint(tmp_path / "ckpt", "clt", "relu", model="smollm2_135m")
    out = export(export_cfg(f"checkpoint={ckpt}", "format=circuit_tracer", f"out={tmp_path / 'my_clt'}"))
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["model_name"], config["scan"]) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "my_clt")
    out = export(export_cfg(f"checkpoint={ckpt}", "format=circuit_tracer", f"out={tmp_path / 'b'}",
                            "scan=smollm2-clt-v1", "model_name=local/smol"))
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["model_name"], config["scan"]) == ("local/smol", "smollm2-clt-v1")


def test_hub_name_maps_transformer_lens_names_to_the_hub():
    from nn_decomp.models import hub_name
    assert hub_name("pythia-70m") == "EleutherAI/pythia-70m"
    assert hub_name("gpt2") == "gpt2"
    assert hub_name("my-org/my-model") == "my-org/my-model"


@pytest.mark.parametrize("n_layers, arch, message", [
    (5, "LlamaForCausalLM", "first_n_layers=3"),
    (3, "Gemma2ForCausalLM", "folding knows"),
    (None, None, "python -m nn_decomp.export format=hf_model out="),
])
def test_folding_refuses_a_model_it_does_not_match(tmp_path, n_layers, arch, message):
    hf = fake_hf_model(tmp_path / "hf", n_layers, arch=arch)[0] if n_layers else tmp_path / "no_such_folder"
    ckpt, _ = random_checkpoint(tmp_path / "ckpt", "clt", "relu")
    with pytest.raises(UsageError, match=message):
        export(export_cfg(f"checkpoint={ckpt}", "format=circuit_tracer", f"out={tmp_path / 'ct'}", f"hf_model={hf}"))
    assert not (tmp_path / "ct").exists()


def test_hf_model_folder_runs_like_our_model(tmp_path):
    """format=hf_model: SmolLM2 as a Hugging Face folder, readable by others, rope θ where
    transformers 4.x looks for it, computing what our TransformerLens model computes."""
    from transformers import AutoModelForCausalLM

    from nn_decomp.models import load_model
    out = export(export_cfg("format=hf_model", f"out={tmp_path / 'smol'}", "first_n_layers=1"))
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["rope_theta"]) == (1, 100000.0)
    assert (out / "model.safetensors").stat().st_mode & 0o044 == 0o044 & ~current_umask()
    ours = load_model("smollm2_135m", device="cpu", first_n_layers=1)
    tokens = ours.to_tokens("The state of the union is strong, and the")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        theirs_logits, our_logits = hf(tokens).logits, ours(tokens)
    centred = lambda logits: logits - logits.mean(-1, keepdim=True)  # noqa: E731  (TL centres the unembedding)
    torch.testing.assert_close(centred(theirs_logits), centred(our_logits), atol=2e-4, rtol=1e-4)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- circuit-tracer itself, in its own Python (opt-in) ------------------------------------------

needs_circuit_tracer = pytest.mark.skipif(
    find_python(CIRCUIT_TRACER) is None, reason=f"opt-in: create circuit-tracer's Python with "
    f"`{CIRCUIT_TRACER.setup_command}` (or set {CIRCUIT_TRACER.env_var}; README: Attribution graphs with circuit-tracer)")


def run_circuit_tracer_check(loaders: list, tensors: dict, replacement: dict | None = None) -> dict:
    return run_worker(CIRCUIT_TRACER, WORKERS / "circuit_tracer_check.py",
                      {"loaders": loaders, "replacement": replacement}, tensors, timeout=1200)


def loader_case(tmp_path, name: str, arch: str, act: str) -> tuple[dict, dict]:
    """Export random dictionaries over layers 0..2; the check's args and what ours compute on random
    inputs (its tensors `name`)."""
    if arch == "clt":
        ckpt, coder = random_checkpoint(tmp_path / name, arch, act)
        checkpoints, coders = f"checkpoint={ckpt}", [coder]
    else:
        made = [random_checkpoint(tmp_path / f"{name}{i}", arch, act, f"arch.layers=[{i}]", seed=i) for i in range(3)]
        checkpoints, coders = f"checkpoints=[{','.join(str(p) for p, _ in made)}]", [c for _, c in made]
    out = export(export_cfg(checkpoints, "format=circuit_tracer", f"out={tmp_path / 'exports' / name}"))
    x_NLD = torch.randn(40, 3, 12)
    with torch.no_grad():  # a CLT reads all layers; transcoder i reads layer i
        outputs = [coders[0](x_NLD)] if arch == "clt" else [c(x_NLD[:, i:i + 1]) for i, c in enumerate(coders)]
    ours = {"x_LND": x_NLD.transpose(0, 1),
            "features_LNF": torch.cat([o.latents.dense() for o in outputs], 1).transpose(0, 1),
            "recon_LND": torch.cat([o.recon for o in outputs], 1).transpose(0, 1)}
    return {"export": str(out), "tensors": name}, ours


@needs_circuit_tracer
def test_circuit_tracer_loaders_compute_what_we_compute(tmp_path):
    made = [loader_case(tmp_path, "clt_jumprelu", "clt", "jumprelu"), loader_case(tmp_path, "clt_relu", "clt", "relu"),
            loader_case(tmp_path, "tc_jumprelu", "transcoder", "jumprelu"),
            loader_case(tmp_path, "skip_relu", "skip_transcoder", "relu")]
    result = run_circuit_tracer_check([case for case, _ in made], {case["tensors"]: ours for case, ours in made})["loaders"]
    for case, _ in made:
        assert result[case["export"]]["features"] < 3e-5, (case, result)
        assert result[case["export"]]["recon"] < 3e-5, (case, result)


@needs_circuit_tracer
def test_circuit_tracer_builds_an_attribution_graph_on_smollm2_with_our_folded_clt(tmp_path):
    """The recipe end to end on a 2-layer SmolLM2: the Hugging Face folder, a CLT exported with its
    norm folded, circuit-tracer's nnsight replacement model reading features as our TL model does."""
    from nn_decomp.models import load_model
    hf = export(export_cfg("format=hf_model", f"out={tmp_path / 'smol2'}", "first_n_layers=2"))
    ckpt, coder = random_checkpoint(tmp_path / "ckpt", "clt", "jumprelu", "arch.layers=[0,1]", d=576,
                                    model="smollm2_135m")
    out = export(export_cfg(f"checkpoint={ckpt}", "format=circuit_tracer", f"out={tmp_path / 'exports' / 'clt'}",
                            f"hf_model={hf}"))
    prompt = "The state of the union is"
    model = load_model("smollm2_135m", device="cpu", first_n_layers=2)
    tokens = model.to_tokens(prompt)
    hooks = [f"blocks.{i}.ln2.hook_normalized" for i in range(2)]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=hooks)
        features_PLF = coder(torch.stack([cache[h][0] for h in hooks], 1)).latents.dense()
    ours = {"tokens": tokens[0], "features_LPF": features_PLF.transpose(0, 1),
            "logits_PV": logits[0] - logits[0].mean(-1, keepdim=True)}
    result = run_circuit_tracer_check([], {"ours": ours}, {"export": str(out), "hf_model": str(hf), "tensors": "ours",
                                                           "prompt": prompt})["replacement"]
    print("circuit-tracer replacement check:", result)
    assert result["logits"] < 1e-3 and result["features"] < 1e-4 * max(1.0, result["feature_scale"]), result
    assert result["graph_active_features"] > 0 and result["graph_finite"], result


# --- formats that cannot represent the dictionary, and overwriting ---------------------------------

CONVERT_HINT = (r"python -m nn_decomp.convert checkpoint=\S+/ckpt, "
                r"then rerun with checkpoint=\S+/ckpt_jumprelu$")


@pytest.mark.parametrize("arch, act, fmt, message", [
    ("transcoder", "topk", "saelens", CONVERT_HINT),
    ("clt", "jumprelu", "saelens", "use format=circuit_tracer"),
    ("clt", "topk", "circuit_tracer", CONVERT_HINT),
    ("sae", "relu", "circuit_tracer", "format=saelens"),
    ("transcoder", "relu", "circuit_tracer", r"layers 0\.\.2 \(these cover \[2\]\)"),
    ("crosscoder", "relu", "saelens", "saelens has no crosscoder: its format is our checkpoint"),
    ("molt", "jumprelu", "circuit_tracer", "circuit_tracer has no molt: its format is our checkpoint"),
])
def test_unrepresentable_export_fails_naming_the_fix(tmp_path, arch, act, fmt, message):
    ckpt, _ = random_checkpoint(tmp_path / "ckpt", arch, act, *["act.token_norm=true"] * (act == "batchtopk"))
    with pytest.raises(UsageError, match=message):
        export(export_cfg(f"checkpoint={ckpt}", f"format={fmt}", f"out={tmp_path / 'out'}"))
    assert not (tmp_path / "out").exists()


def test_topk_sae_with_unequal_decoder_norms_is_refused_naming_the_conversion(tmp_path):
    # unit rows would rescale each latent differently and change SAELens' top-k selection
    ckpt, _ = random_checkpoint(tmp_path / "ckpt", "sae", "topk", decoder_scale=torch.linspace(1, 2, 64)[:, None, None])
    with pytest.raises(UsageError, match="decoder rows differ in norm .*" + CONVERT_HINT):
        export(export_cfg(f"checkpoint={ckpt}", "format=saelens", f"out={tmp_path / 'out'}"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch, fmt", [("clt", "circuit_tracer"), ("transcoder", "saelens")])
def test_token_norm_off_a_norms_output_is_refused_naming_the_retrain(tmp_path, arch, fmt):
    ckpt, _ = random_checkpoint(tmp_path / "ckpt", arch, "batchtopk", "act.token_norm=true",
                                "arch.hook_in='blocks.{layer}.hook_resid_mid'")
    with pytest.raises(UsageError, match=r"at blocks\.\d\.hook_resid_mid \(no norm's output\) act.token_norm is not "
                                         r"the identity: retrain .*with act.token_norm=false$"):
        export(export_cfg(f"checkpoint={ckpt}", f"format={fmt}", f"out={tmp_path / 'out'}"))


@pytest.mark.parametrize("arch", ["clt", "transcoder"])
def test_token_norm_on_a_norms_output_exports_as_the_identity_it_is(tmp_path, arch):
    """BatchTopK's default act.token_norm scales rows to norm √d, which ln2.hook_normalized rows have
    already: circuit-tracer (and SAELens, for a transcoder) get the dictionary without it, and compute
    what our coder computes on such rows."""
    layers = [0] if arch == "clt" else [0, 1, 2]
    made = [random_checkpoint(tmp_path / f"l{i}", arch, "batchtopk", "act.token_norm=true",
                              *[f"arch.layers=[{i}]"] * (arch != "clt"), seed=i) for i in layers]
    assert all(coder.activation.token_norm for _, coder in made)
    paths = ",".join(str(p) for p, _ in made)
    out = export(export_cfg(f"checkpoints=[{paths}]", "format=circuit_tracer", f"out={tmp_path / 'ct'}"))
    x_LND = torch.randn(3, 40, 12)
    x_LND = x_LND / x_LND.norm(dim=-1, keepdim=True) * 12 ** 0.5  # a norm's output
    with torch.no_grad():
        expected = (made[0][1](x_LND.transpose(0, 1)).recon if arch == "clt" else
                    torch.stack([coder(x_LND[i][:, None]).recon[:, 0] for i, (_, coder) in enumerate(made)], 1))
    torch.testing.assert_close(circuit_tracer_forward(out, 3, x_LND, clt=arch == "clt"), expected, atol=1e-5, rtol=1e-5)
    if arch == "transcoder":
        sl = export(export_cfg(f"checkpoint={made[0][0]}", "format=saelens", f"out={tmp_path / 'sl'}"))
        assert json.loads((sl / SAELENS_CFG).read_text())["normalize_activations"] == "none"


def test_topk_in_a_set_is_refused_naming_the_convert_and_export_commands(tmp_path):
    """The set's paths are sweep dirs named before path_safe (= , [ ] in them): the hint quotes them,
    and its two arguments, read as a shell and Hydra read them, give back exactly those paths."""
    made = [random_checkpoint(tmp_path / f"act.k=4,act={act},arch.layers=[{i}]" / "checkpoint", "transcoder", act,
                              f"arch.layers=[{i}]", seed=i)[0] for i, act in enumerate(["jumprelu", "topk", "topk"])]
    listed = ",".join(f'"{p}"' for p in made)
    with pytest.raises(UsageError) as refusal:
        export(export_cfg(f"checkpoints=[{listed}]", "format=circuit_tracer", f"out={tmp_path / 'ct'}"))
    convert_arg, export_arg = re.fullmatch(r"circuit-tracer has no TopK activation: convert first with python -m "
                                           r"nn_decomp.convert (.+), then rerun with (.+)",
                                           str(refusal.value)).groups()
    parse = OverridesParser.create().parse_override
    (convert_arg,), (export_arg,) = shlex.split(convert_arg), shlex.split(export_arg)
    assert parse(convert_arg).key_or_group == parse(export_arg).key_or_group == "checkpoints"
    assert parse(convert_arg).value() == [str(p) for p in made[1:]]
    assert parse(export_arg).value() == [str(made[0]), *(str(p) + "_jumprelu" for p in made[1:])]


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
    sl_cfg = json.loads((out / SAELENS_CFG).read_text())
    (out / SAELENS_CFG).write_text(json.dumps(sl_cfg | {"normalize_activations": "expected_average_only_in"}))
    with pytest.raises(UsageError, match="fold_activation_norm_scaling_factor"):  # only constant_norm_rescale is ours
        import_saelens(out, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(UsageError, match="pass out=DIR"):
        export(export_cfg(f"checkpoint={ckpt}", "format=saelens"))
    with pytest.raises(UsageError, match="format=onnx"):
        export(export_cfg(f"checkpoint={ckpt}", "format=onnx", f"out={tmp_path / 'o'}"))


def test_cli_refusal_is_one_line_naming_the_conversion(tmp_path):
    ckpt, _ = random_checkpoint(tmp_path / "ckpt", "transcoder", "topk")
    proc = run_cli("nn_decomp.export", f"checkpoint={ckpt}", "format=saelens", f"out={tmp_path / 'sl'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: SAELens cannot represent arch=transcoder with act=topk: convert first with "
        f"python -m nn_decomp.convert checkpoint={ckpt}, then rerun with checkpoint={ckpt}_jumprelu")
