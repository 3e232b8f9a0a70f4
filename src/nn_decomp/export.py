"""`python -m nn_decomp.export checkpoint=PATH format=saelens|circuit_tracer out=DIR`: write a
dictionary in another library's on-disk format; `import_saelens` (or `from_saelens=DIR out=DIR`)
reads a SAELens SAE back as our checkpoint, so `nn_decomp.evaluate` can score it.

SAELens (≥ 6.0, checked against 6.54.12): `cfg.json` + `sae_weights.safetensors`.
  W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out]; `threshold` [d_sae]
  for jumprelu*, applied as relu(pre)·(pre > θ); `W_skip` [d_out, d_in] applied as x @ W_skip.T.
  Our SAEs never subtract b_dec from the input, so apply_b_dec_to_input is false (SAELens refuses
  it for transcoders anyway), and the weights have the normalisation folded in ("none").
  | ours \\ act     | relu            | topk   | jumprelu / batchtopk (its eval threshold)  |
  | sae             | standard        | topk   | jumprelu                                   |
  | transcoder      | transcoder      |   —    | jumprelu_transcoder                        |
  | skip_transcoder | skip_transcoder |   —    | jumprelu_skip_transcoder                   |
  SAELens has no TopK transcoder and no CLT: convert (nn_decomp.convert) or use circuit_tracer.

circuit-tracer (0.5.0, its `load_transcoders_from_cache` layout): `config.yaml` with model_kind,
feature_input_hook / feature_output_hook (hook names inside `blocks.{i}.`), and
  cross_layer_transcoder: per layer i `W_enc_{i}.safetensors` {W_enc_i [d_tc, d_model], b_enc_i
  [d_tc], b_dec_i [d_model], threshold_i [d_tc]} and `W_dec_{i}.safetensors` {W_dec_i
  [d_tc, n_layers − i, d_model]} (our W_dec layout);
  transcoder_set: `layer_{i}.safetensors` {W_enc [d_tc, d_model], W_dec [d_tc, d_model], b_enc, b_dec,
  activation_function.threshold [d_tc], W_skip [d_model, d_model] applied as x @ W_skip.T}.
  The activation is x·(x > θ) with a threshold, plain ReLU without one; TopK must be converted
  first. File i feeds from `blocks.{i}`, so the dictionaries must cover layers 0..n−1. config.yaml
  also holds model_name (the Hub name, or `model_name=`) and scan (`scan=`, default out's name).
  Its TransformerLens backend reads our hooks as they are; its nnsight backend (the one that runs
  a model from a local folder) reads `mlp.hook_in`, the MLP input after the norm's weight:
  `hf_model=DIR` folds that folder's norm weights into the encoders and names that hook.

`format=hf_model out=DIR [first_n_layers=N]` writes SmolLM2 as a Hugging Face model folder, the
model circuit-tracer runs (README: "Attribution graphs with circuit-tracer").
"""
import json
from pathlib import Path

import hydra
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import Tensor

import nn_decomp.config  # noqa: F401  (registers base_export)
from nn_decomp.runtime.checkpoint import build_coder, read_config, save_checkpoint
from nn_decomp.runtime.files import fresh_tmp, publish_dir
from nn_decomp.config import UsageError
from nn_decomp.config.arch import CHECKPOINT_ONLY
from nn_decomp.dictionaries import HookedDictionary, checkpoint_list, load_dictionaries
from nn_decomp.runtime.files import refuse_existing
from nn_decomp.runtime.jobs import exit_on_usage_error

FORMATS = ("saelens", "circuit_tracer", "hf_model")
SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"  # the config layout we write; older ones are read as pre-6 configs
SAELENS_ARCH = {("sae", "relu"): "standard", ("sae", "topk"): "topk", ("sae", "jumprelu"): "jumprelu",
                ("transcoder", "relu"): "transcoder", ("transcoder", "jumprelu"): "jumprelu_transcoder",
                ("skip_transcoder", "relu"): "skip_transcoder",
                ("skip_transcoder", "jumprelu"): "jumprelu_skip_transcoder"}
CONF = Path(__file__).resolve().parents[2] / "conf"
# circuit-tracer's nnsight hook `mlp.hook_in` is this RMSNorm's output, weight ⊙ x / rms(x); our
# `ln2.hook_normalized` is x / rms(x) (TL folds the weight into W_in).
MLP_INPUT_NORM = {"LlamaForCausalLM": "model.layers.{layer}.post_attention_layernorm.weight",
                  "Qwen3ForCausalLM": "model.layers.{layer}.post_attention_layernorm.weight"}


# --- shared ----------------------------------------------------------------------------------

def act_family(act: str) -> str:
    """BatchTopK runs as a JumpReLU at inference (pre·H(pre − θ)), so it exports as one."""
    return "jumprelu" if act == "batchtopk" else act


def thresholds(d: HookedDictionary) -> Tensor | None:
    """[L, F] inference thresholds of a JumpReLU / BatchTopK coder (None for ReLU, TopK)."""
    theta = getattr(d.coder.activation, "threshold", None)
    return None if theta is None else theta.detach().float().clamp(min=0)


def write_dir(out: Path, files: dict[str, dict[str, Tensor] | str], overwrite: bool) -> Path:
    """Write {name: tensors (safetensors) or text} into `out` atomically."""
    refuse_existing([out], overwrite)
    tmp = fresh_tmp(out)
    for name, content in files.items():
        if isinstance(content, str):
            (tmp / name).write_text(content)
        else:
            save_file({k: v.detach().float().contiguous().cpu() for k, v in content.items()}, tmp / name)
    publish_dir(tmp, out)
    return out


def write_hf_dir(out: Path, first_n_layers: int | None) -> Path:
    from nn_decomp.models import write_hf_model  # imports transformers: only here
    tmp = fresh_tmp(out)
    write_hf_model(tmp, first_n_layers)
    publish_dir(tmp, out)
    return out


def export_decoders(d: HookedDictionary, fmt: str) -> list[Tensor]:
    """Per source layer, [F, L−i, D]: tying expanded, feature_scale folded into the rows (exact);
    a feature offset has no equivalent in the other formats."""
    coder = d.coder
    if coder.feature_offset is not None:
        raise UsageError(f"{fmt} has no per-feature offset: retrain without arch.feature_offset to export {d.path}")
    scale_LF = coder.feature_scale
    return [w if scale_LF is None else w * scale_LF[i][:, None, None] for i, w in enumerate(coder.decoders())]


def convert_hint(d: HookedDictionary) -> str:
    return (f"convert it first: python -m nn_decomp.convert checkpoint={d.path} to=jumprelu, "
            "then export the converted checkpoint")


# --- SAELens ---------------------------------------------------------------------------------

def saelens_files(d: HookedDictionary, meta: dict, ckpt_cfg: DictConfig) -> dict:
    arch, act = meta["arch"], act_family(meta["act"])
    if arch == "clt":
        raise UsageError("SAELens has no cross-layer transcoder: use format=circuit_tracer")
    if (arch, act) not in SAELENS_ARCH:
        hint = convert_hint(d) if act == "topk" else "retrain with act=jumprelu or relu"
        raise UsageError(f"SAELens cannot represent arch={arch} with act={meta['act']}: {hint}")
    coder = d.coder
    if coder.activation.token_norm and arch != "sae":
        raise UsageError(f"SAELens applies constant_norm_rescale to an SAE's output only: export a {arch} "
                         "trained with act.token_norm=false")
    tensors = {"W_enc": coder.W_enc[0].T, "b_enc": coder.b_enc[0], "W_dec": export_decoders(d, "SAELens")[0][:, 0],
               "b_dec": coder.b_dec[0]}
    if coder.W_skip is not None:
        tensors["W_skip"] = coder.W_skip[0].T  # ours: x @ W_skip; SAELens: x @ W_skip.T
    theta = thresholds(d)
    if theta is not None:
        tensors["threshold"] = theta[0]
    architecture = SAELENS_ARCH[(arch, act)]
    cfg = {"architecture": architecture, "d_in": coder.d_in, "d_sae": coder.n_latents, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": False,
           # token_norm is SAELens' constant_norm_rescale: x·√d/‖x‖ in, the output divided back
           "normalize_activations": "constant_norm_rescale" if coder.activation.token_norm else "none",
           "reshape_activations": "none"}
    if arch != "sae":
        cfg["d_out"] = coder.d_out
    if architecture == "topk":
        cfg |= {"k": coder.activation.k, "rescale_acts_by_decoder_norm": False}
    cfg["metadata"] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION, "model_name": meta["model"], "hook_name": d.hooks_in[0],
        "hook_head_index": None, "prepend_bos": ckpt_cfg.data.prepend_bos,
        "context_size": ckpt_cfg.data.context_size, "dataset_path": ckpt_cfg.data.path or ckpt_cfg.data.source,
        "nn_decomp": {"checkpoint": str(d.path), "arch": arch, "act": meta["act"], "layer": d.layers[0]}}
    if arch != "sae":
        cfg["metadata"] |= {"hook_name_out": d.hooks_out[0], "hook_head_index_out": None}
    return {SAELENS_CFG: json.dumps(cfg, indent=2), SAELENS_WEIGHTS: tensors}


def import_saelens(src: str | Path, out: str | Path, overwrite: bool = False, model_name: str | None = None) -> Path:
    """Write the SAELens SAE in `src` as our checkpoint in `out` (loadable by load_dictionary,
    evaluable by nn_decomp.evaluate); returns `out`."""
    src, out = Path(src), Path(out)
    if not (src / SAELENS_CFG).exists() or not (src / SAELENS_WEIGHTS).exists():
        raise UsageError(f"{src} is not a SAELens SAE dir (needs {SAELENS_CFG} and {SAELENS_WEIGHTS})")
    refuse_existing([out], overwrite)
    sl_cfg = json.loads((src / SAELENS_CFG).read_text())
    sl_meta = sl_cfg.get("metadata") or {}
    get = lambda key: sl_meta.get(key, sl_cfg.get(key))  # noqa: E731  (pre-6 configs keep them at the top)
    architecture = sl_cfg.get("architecture", "standard")
    ours = {v: k for k, v in SAELENS_ARCH.items()}
    if architecture not in ours:
        raise UsageError(f"SAELens architecture {architecture!r} has no nn_decomp equivalent; supported: {sorted(ours)}")
    arch, act = ours[architecture]
    normalize = sl_cfg.get("normalize_activations", "none")
    if normalize not in ("none", "constant_norm_rescale"):  # the latter is our act.token_norm
        raise UsageError(f"{src}: normalize_activations={normalize!r}; fold it into the "
                         "weights in SAELens first (sae.fold_activation_norm_scaling_factor) and save again")
    if sl_cfg.get("rescale_acts_by_decoder_norm") or get("hook_head_index") is not None \
            or sl_cfg.get("reshape_activations", "none") != "none":
        raise UsageError(f"{src}: decoder-norm rescaling and per-head (hook_z) SAEs are not supported")
    hook_in = get("hook_name") or get("hook_point")
    hook_out = get("hook_name_out") if arch != "sae" else hook_in
    if not hook_in or not hook_out:
        raise UsageError(f"{src}/{SAELENS_CFG} lacks metadata.hook_name{'_out' if hook_in else ''}: add it")
    from nn_decomp.data.hooks import hook_layer

    layer = hook_layer(hook_in)
    w = load_file(src / SAELENS_WEIGHTS)
    W_enc, b_enc = w["W_enc"].float(), w["b_enc"].float()
    if sl_cfg.get("apply_b_dec_to_input", arch == "sae"):
        b_enc = b_enc - w["b_dec"].float() @ W_enc  # (x − b_dec)·W_enc + b_enc, with x read raw
    state = {"W_enc": W_enc.T[None], "b_enc": b_enc[None], "W_dec.0": w["W_dec"].float()[:, None],
             "b_dec": w["b_dec"].float()[None]}
    if "W_skip" in w:
        state["W_skip"] = w["W_skip"].float().T[None]
    if act == "jumprelu":
        # SAELens: relu(pre)·(pre > θ); ours: pre·(pre > θ), θ > 0 — equal once θ ≥ the tiniest positive.
        state["activation.log_threshold"] = w["threshold"].float().clamp(min=torch.finfo(torch.float32).tiny).log()[None]
    d_in, n_latents, d_out = W_enc.shape[0], W_enc.shape[1], w["W_dec"].shape[1]
    overrides = [f"arch={arch}", f"act={act}", f"arch.layers=[{layer}]", f"arch.n_latents={n_latents}",
                 f"act.token_norm={str(normalize == 'constant_norm_rescale').lower()}"]
    if act == "topk":
        overrides.append(f"act.k={sl_cfg['k']}")
    cfg = compose_config(overrides)
    cfg.arch.hook_in = template(hook_in, layer)
    cfg.arch.hook_out = None if arch == "sae" else template(hook_out, layer)
    cfg.model.name = model_name or get("model_name")
    cfg.paths.output_dir = str(out.parent)
    OmegaConf.resolve(cfg)
    coder = build_coder(cfg, d_in, d_out)
    coder.load_state_dict(state)
    meta = {"model": cfg.model.name, "arch": arch, "act": act, "layers": [layer], "hooks_in": [hook_in],
            "hooks_out": [hook_out], "d_in": d_in, "d_out": d_out, "n_latents": n_latents,
            "imported_from": {"format": "saelens", "path": str(src), "architecture": architecture}}
    save_checkpoint(out, coder, cfg, meta)
    return out


def template(hook: str, layer: int) -> str:
    return hook.replace(f"blocks.{layer}.", "blocks.{layer}.", 1)


def compose_config(overrides: list[str]) -> DictConfig:
    """Our default training config with `overrides` (inside a running Hydra app too)."""
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


# --- circuit-tracer --------------------------------------------------------------------------

def circuit_tracer_files(dictionaries: list[HookedDictionary], metas: list[dict], cfg: DictConfig) -> dict:
    from nn_decomp.models import hub_name  # imports transformer_lens: only here
    for d, meta in zip(dictionaries, metas):
        if meta["arch"] == "sae":
            raise UsageError("circuit-tracer runs transcoders (hook_in ≠ hook_out); export an SAE with format=saelens")
        if act_family(meta["act"]) == "topk":
            raise UsageError(f"circuit-tracer has no TopK activation: {convert_hint(d)}")
        if d.coder.activation.token_norm:
            raise UsageError(f"{d.path}: circuit-tracer has no per-token input normalisation; retrain with "
                             "act.token_norm=false to export this dictionary")
    layers = [layer for d in dictionaries for layer in d.layers]
    if layers != list(range(len(layers))):
        raise UsageError(f"circuit-tracer feeds file i from blocks.{{i}}, so it needs layers 0..{max(layers)} "
                         f"(these cover {layers}): pass checkpoints=[...] with one transcoder per layer from 0")
    suffixes = {(suffix(h_in, layer), suffix(h_out, layer)) for d in dictionaries
                for h_in, h_out, layer in zip(d.hooks_in, d.hooks_out, d.layers)}
    if len(suffixes) > 1:
        raise UsageError(f"circuit-tracer needs the same hooks at every layer, got {sorted(suffixes)}")
    if dictionaries[0].coder.cross_layer and dictionaries[0].coder.W_skip is not None:
        raise UsageError("circuit-tracer 0.5's load_clt reads no skip weights: export a CLT trained without arch.skip")
    if len({d.coder.W_skip is None for d in dictionaries}) > 1:
        raise UsageError("mix of skip and plain transcoders: circuit-tracer takes one kind per set")
    (hook_in, hook_out), = suffixes
    norm_LD = torch.ones(len(layers), dictionaries[0].coder.d_in)
    if cfg.hf_model:
        norm_LD, hook_in = mlp_input_norm(Path(cfg.hf_model), len(layers), hook_in), "mlp.hook_in"
    clt = dictionaries[0].coder.cross_layer
    config = {"model_kind": "cross_layer_transcoder" if clt else "transcoder_set",
              "model_name": cfg.model_name or hub_name(metas[0]["model"]),
              "feature_input_hook": hook_in, "feature_output_hook": hook_out, "scan": cfg.scan or Path(cfg.out).name}
    files = {"config.yaml": yaml.safe_dump(config, sort_keys=False)}
    if clt:
        files |= clt_tensors(dictionaries[0], norm_LD)
    else:
        files |= {f"layer_{d.layers[0]}.safetensors": transcoder_tensors(d, norm_LD[d.layers[0]]) for d in dictionaries}
    return files


def mlp_input_norm(folder: Path, n_layers: int, hook_in: str) -> Tensor:
    """[L, d] the weights of the RMSNorm before each MLP of the Hugging Face model in `folder`.
    An encoder W reading x / rms(x) reads the same from weight ⊙ x / rms(x) as W / weight."""
    if hook_in != "ln2.hook_normalized":
        raise UsageError(f"hf_model= folds the MLP-input norm into encoders that read ln2.hook_normalized, "
                         f"not {hook_in}: export without hf_model= and use circuit-tracer's TransformerLens backend")
    if not (folder / "config.json").is_file():
        raise UsageError(f"hf_model={folder} has no config.json: write SmolLM2 there with "
                         f"python -m nn_decomp.export format=hf_model out={folder}")
    config = json.loads((folder / "config.json").read_text())
    arch = config["architectures"][0]
    if arch not in MLP_INPUT_NORM:
        raise UsageError(f"hf_model={folder} is a {arch}; folding knows {sorted(MLP_INPUT_NORM)}")
    if config["num_hidden_layers"] != n_layers:
        raise UsageError(f"circuit-tracer replaces every MLP of hf_model={folder} ({config['num_hidden_layers']} "
                         f"layers) but these dictionaries cover 0..{n_layers - 1}: train them on every layer, or "
                         f"write a model of their depth with format=hf_model first_n_layers={n_layers}")
    names = [MLP_INPUT_NORM[arch].format(layer=layer) for layer in range(n_layers)]
    weights = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights |= {k: v for k, v in load_file(path).items() if k in names}
    norm_LD = torch.stack([weights[name].float() for name in names])
    if not norm_LD.all():
        raise UsageError(f"hf_model={folder} has zero MLP-input norm weights: they cannot be folded into an encoder")
    return norm_LD


def clt_tensors(d: HookedDictionary, norm_LD: Tensor) -> dict:
    coder, theta, decoders = d.coder, thresholds(d), export_decoders(d, "circuit-tracer")
    files = {}
    for i in range(coder.n_layers):
        enc = {f"W_enc_{i}": coder.W_enc[i] / norm_LD[i], f"b_enc_{i}": coder.b_enc[i], f"b_dec_{i}": coder.b_dec[i]}
        if theta is not None:
            enc[f"threshold_{i}"] = theta[i]
        files[f"W_enc_{i}.safetensors"] = enc
        files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": decoders[i]}
    return files


def transcoder_tensors(d: HookedDictionary, norm_D: Tensor) -> dict:
    coder, theta = d.coder, thresholds(d)
    tensors = {"W_enc": coder.W_enc[0] / norm_D, "W_dec": export_decoders(d, "circuit-tracer")[0][:, 0],
               "b_enc": coder.b_enc[0], "b_dec": coder.b_dec[0]}
    if theta is not None:
        tensors["activation_function.threshold"] = theta[0]
    if coder.W_skip is not None:
        tensors["W_skip"] = coder.W_skip[0].T / norm_D  # circuit-tracer: x @ W_skip.T
    return tensors


def suffix(hook: str, layer: int) -> str:
    prefix = f"blocks.{layer}."
    if not hook.startswith(prefix):
        raise UsageError(f"{hook} is not inside blocks.{layer}: circuit-tracer hooks live in the blocks")
    return hook[len(prefix):]


# --- driver ----------------------------------------------------------------------------------

def export(cfg: DictConfig) -> Path:
    """Export (or, with from_saelens, import) as `cfg` says; returns the written dir."""
    if not cfg.out:
        raise UsageError("pass out=DIR for the exported files")
    if cfg.get("from_saelens"):
        return import_saelens(cfg.from_saelens, cfg.out, cfg.overwrite, cfg.get("model_name"))
    if cfg.format not in FORMATS:
        raise UsageError(f"format={cfg.format}: choose one of {FORMATS}")
    refuse_existing([Path(cfg.out)], cfg.overwrite)
    if cfg.format == "hf_model":
        return write_hf_dir(Path(cfg.out), cfg.first_n_layers)
    dictionaries = load_dictionaries(checkpoint_list(cfg))
    metas = [read_config(d.path)[1] for d in dictionaries]
    for meta, d in zip(metas, dictionaries):
        if meta["arch"] in CHECKPOINT_ONLY:
            raise UsageError(f"{cfg.format} has no {meta['arch']}: its format is our checkpoint ({d.path}: "
                             "config.yaml + safetensors, read by nn_decomp.runtime.checkpoint.load_dictionary)")
    with torch.no_grad():
        if cfg.format == "saelens":
            if len(dictionaries) > 1:
                raise UsageError("SAELens holds one SAE per directory: export each checkpoint on its own")
            files = saelens_files(dictionaries[0], metas[0], read_config(dictionaries[0].path)[0])
        else:
            files = circuit_tracer_files(dictionaries, metas, cfg)
        return write_dir(Path(cfg.out), files, cfg.overwrite)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    print(f"wrote {exit_on_usage_error(export, cfg)}")


if __name__ == "__main__":
    main()
