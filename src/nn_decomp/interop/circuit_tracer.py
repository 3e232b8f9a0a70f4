"""circuit-tracer (0.5.0, its `load_transcoders_from_cache` layout), written from loaded dictionaries
(`circuit_tracer_files`): `config.yaml` with model_kind, feature_input_hook / feature_output_hook
(hook names inside `blocks.{i}.`), and
  cross_layer_transcoder: per layer i `W_enc_{i}.safetensors` {W_enc_i [d_tc, d_model], b_enc_i
  [d_tc], b_dec_i [d_model], threshold_i [d_tc]} and `W_dec_{i}.safetensors` {W_dec_i
  [d_tc, n_layers − i, d_model]} (our W_dec layout);
  transcoder_set: `layer_{i}.safetensors` {W_enc [d_tc, d_model], W_dec [d_tc, d_model], b_enc, b_dec,
  activation_function.threshold [d_tc], W_skip [d_model, d_model] applied as x @ W_skip.T}.
  The activation is x·(x > θ) with a threshold, plain ReLU without one; TopK must be converted
  first. There is no per-token input normalisation: act.token_norm (BatchTopK's default) is
  dropped where it is the identity, on a norm's output (`formats.token_norm_is_identity`), and
  refused elsewhere. File i feeds from `blocks.{i}`, so the dictionaries must cover layers
  0..n−1. config.yaml also holds model_name (the Hub name, or `model_name=`) and scan (`scan=`,
  default out's name). Its TransformerLens backend reads our hooks as they are; its nnsight backend (the one that runs
  a model from a local folder) reads `mlp.hook_in`, the MLP input after the norm's weight:
  `hf_model=DIR` folds that folder's norm weights into the encoders and names that hook.

circuit-tracer itself pins transformers <= 4.57.3 (ours is 5.x): it runs in its own Python
(`CIRCUIT_TRACER`, through nn_decomp.interop.bridge).
"""
import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor

from nn_decomp.dictionaries import HookedDictionary
from nn_decomp.config import UsageError
from nn_decomp.interop.bridge import Tool
from nn_decomp.interop.formats import act_family, convert_hint, export_decoders, thresholds, token_norm_is_identity

CIRCUIT_TRACER = Tool("circuit-tracer")
# circuit-tracer's nnsight hook `mlp.hook_in` is this RMSNorm's output, weight ⊙ x / rms(x); our
# `ln2.hook_normalized` is x / rms(x) (TL folds the weight into W_in).
MLP_INPUT_NORM = {"LlamaForCausalLM": "model.layers.{layer}.post_attention_layernorm.weight",
                  "Qwen3ForCausalLM": "model.layers.{layer}.post_attention_layernorm.weight"}


def circuit_tracer_files(dictionaries: list[HookedDictionary], metas: list[dict], hf_model: str | None,
                         model_name: str | None, scan: str) -> dict:
    """The export's files: `hf_model` folds that folder's MLP-input norms in, `model_name` (default: the
    Hub name of the checkpoints' model) and `scan` go into config.yaml."""
    from nn_decomp.models import hub_name  # imports transformer_lens: only here
    if any(meta["arch"] == "sae" for meta in metas):
        raise UsageError("circuit-tracer runs transcoders (hook_in ≠ hook_out); export an SAE with format=saelens")
    topk = [d for d, meta in zip(dictionaries, metas) if act_family(meta["act"]) == "topk"]
    if topk:
        raise UsageError(f"circuit-tracer has no TopK activation: {convert_hint(dictionaries, topk)}")
    for d in dictionaries:
        if d.coder.activation.token_norm and not token_norm_is_identity(d):
            # convert would not help: its JumpReLU keeps token_norm, its thresholds fitted in that space
            raise UsageError(f"{d.path}: circuit-tracer has no per-token input normalisation, and at "
                             f"{d.hooks_in[0]} (no norm's output) act.token_norm is not the identity: retrain "
                             "with act.token_norm=false")
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
    if hf_model:
        norm_LD, hook_in = mlp_input_norm(Path(hf_model), len(layers), hook_in), "mlp.hook_in"
    clt = dictionaries[0].coder.cross_layer
    config = {"model_kind": "cross_layer_transcoder" if clt else "transcoder_set",
              "model_name": model_name or hub_name(metas[0]["model"]),
              "feature_input_hook": hook_in, "feature_output_hook": hook_out, "scan": scan}
    files = {"config.yaml": yaml.safe_dump(config, sort_keys=False)}
    if clt:
        files |= clt_tensors(dictionaries[0], norm_LD)
    else:
        files |= {f"layer_{d.layers[0]}.safetensors": transcoder_tensors(d, norm_LD[d.layers[0]]) for d in dictionaries}
    return files


def hf_model_config(folder: Path) -> dict:
    """The config.json of a Hugging Face model folder given as hf_model=."""
    if not (folder / "config.json").is_file():
        raise UsageError(f"hf_model={folder} has no config.json: write SmolLM2 there with "
                         f"python -m nn_decomp.export format=hf_model out={folder}")
    return json.loads((folder / "config.json").read_text())


def mlp_input_norm(folder: Path, n_layers: int, hook_in: str) -> Tensor:
    """[L, d] the weights of the RMSNorm before each MLP of the Hugging Face model in `folder`.
    An encoder W reading x / rms(x) reads the same from weight ⊙ x / rms(x) as W / weight."""
    if hook_in != "ln2.hook_normalized":
        raise UsageError(f"hf_model= folds the MLP-input norm into encoders that read ln2.hook_normalized, "
                         f"not {hook_in}: export without hf_model= and use circuit-tracer's TransformerLens backend")
    config = hf_model_config(folder)
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
