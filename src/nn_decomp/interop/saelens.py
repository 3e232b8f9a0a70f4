"""SAELens (≥ 6.0, checked against 6.54.12): `cfg.json` + `sae_weights.safetensors`, written from a
loaded dictionary (`saelens_files`) and read back as our checkpoint (`import_saelens`).
  W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out]; `threshold` [d_sae]
  for jumprelu*, applied as relu(pre)·(pre > θ); `W_skip` [d_out, d_in] applied as x @ W_skip.T.
  Our SAEs never subtract b_dec from the input, so apply_b_dec_to_input is false (SAELens refuses
  it for transcoders anyway), and the weights have the normalisation folded in ("none"). Decoder rows
  are written at norm 1, their norms folded into W_enc, b_enc and the threshold (`unit_norm_scale`). An SAE's
  act.token_norm is SAELens' constant_norm_rescale; a transcoder's is dropped where it is the
  identity, on a norm's output (`formats.token_norm_is_identity`), and refused elsewhere.
  | ours \\ act     | relu            | topk   | jumprelu / batchtopk (its eval threshold)  |
  | sae             | standard        | topk   | jumprelu                                   |
  | transcoder      | transcoder      |   —    | jumprelu_transcoder                        |
  | skip_transcoder | skip_transcoder |   —    | jumprelu_skip_transcoder                   |
  SAELens has no TopK transcoder and no CLT: convert (nn_decomp.convert) or use circuit_tracer.
  One layer of a CLT can be written for encoder-side use only (SAEBench's sparse probing and
  autointerp): that layer's encoder, its own l→l decoder rows, its writes to later layers dropped.
"""
import json
from pathlib import Path

import torch
from torch import Tensor
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from nn_decomp.dictionaries import HookedDictionary
from nn_decomp.config import UsageError
from nn_decomp.data.hooks import hook_layer
from nn_decomp.interop.formats import act_family, convert_hint, export_decoders, thresholds, token_norm_is_identity
from nn_decomp.runtime.checkpoint import build_coder, save_checkpoint
from nn_decomp.runtime.files import refuse_existing

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
UNIFORM_NORM_RTOL = 1e-5  # TopK rows this close in norm count as equal (float32 renormalisation)
SAELENS_FORMAT_VERSION = "6.0.0"  # the config layout we write; older ones are read as pre-6 configs
SAELENS_ARCH = {("sae", "relu"): "standard", ("sae", "topk"): "topk", ("sae", "jumprelu"): "jumprelu",
                ("transcoder", "relu"): "transcoder", ("transcoder", "jumprelu"): "jumprelu_transcoder",
                ("skip_transcoder", "relu"): "skip_transcoder",
                ("skip_transcoder", "jumprelu"): "jumprelu_skip_transcoder"}
CONF = Path(__file__).resolve().parents[3] / "conf"


def saelens_files(d: HookedDictionary, meta: dict, ckpt_cfg: DictConfig, clt_layer: int | None = None) -> dict:
    """SAELens' files of `d`; for a CLT, of its `clt_layer`-th layer as a transcoder whose latents are
    the CLT's there (encoder side only: the writes to later layers are dropped, so its reconstruction
    is not the CLT's). Each latent is scaled by the norm of everything it writes, all target layers
    concatenated: for an SAE or transcoder that is the unit-row export; for a CLT layer the latents are
    in the units of their whole contribution, and the l→l rows written have norm ≤ 1."""
    arch, act = meta["arch"], act_family(meta["act"])
    if arch == "clt" and clt_layer is None:
        raise UsageError("SAELens has no cross-layer transcoder: use format=circuit_tracer")
    assert clt_layer is None or arch == "clt"
    i = clt_layer or 0
    kind = "transcoder" if arch == "clt" else arch
    if (kind, act) not in SAELENS_ARCH:
        hint = convert_hint([d], [d]) if act == "topk" else "retrain with act=jumprelu or relu"
        raise UsageError(f"SAELens cannot represent arch={arch} with act={meta['act']}: {hint}")
    coder = d.coder
    rescale = coder.activation.token_norm and arch == "sae"
    if coder.activation.token_norm and arch != "sae" and not token_norm_is_identity(d):
        raise UsageError(f"SAELens applies constant_norm_rescale to an SAE's output only, and at {d.hooks_in[i]} "
                         f"(no norm's output) act.token_norm is not the identity: retrain the {arch} with "
                         "act.token_norm=false")
    W_dec_FTD = export_decoders(d, "SAELens")[i]
    norms = unit_norm_scale(W_dec_FTD.flatten(1), act, d)
    tensors = {"W_enc": coder.W_enc[i].T * norms, "b_enc": coder.b_enc[i] * norms, "W_dec": W_dec_FTD[:, 0] / norms[:, None],
               "b_dec": coder.b_dec[i]}
    if coder.W_skip is not None:
        tensors["W_skip"] = coder.W_skip[i].T  # ours: x @ W_skip; SAELens: x @ W_skip.T
    theta = thresholds(d)
    if theta is not None:
        tensors["threshold"] = theta[i] * norms
    architecture = SAELENS_ARCH[(kind, act)]
    cfg = {"architecture": architecture, "d_in": coder.d_in, "d_sae": coder.n_latents, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": False,
           # an SAE's token_norm is SAELens' constant_norm_rescale: x·√d/‖x‖ in, the output divided back
           "normalize_activations": "constant_norm_rescale" if rescale else "none",
           "reshape_activations": "none"}
    if arch != "sae":
        cfg["d_out"] = coder.d_out
    if architecture == "topk":
        cfg |= {"k": coder.activation.k, "rescale_acts_by_decoder_norm": False}
    ours = {"checkpoint": str(d.path), "arch": arch, "act": meta["act"], "layer": d.layers[i]}
    if arch == "clt":
        ours["encoder_side_only"] = True
    cfg["metadata"] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION, "model_name": meta["model"], "hook_name": d.hooks_in[i],
        "hook_head_index": None, "prepend_bos": ckpt_cfg.data.prepend_bos,
        "context_size": ckpt_cfg.data.context_size, "dataset_path": ckpt_cfg.data.path or ckpt_cfg.data.source,
        "nn_decomp": ours}
    if arch != "sae":
        cfg["metadata"] |= {"hook_name_out": d.hooks_out[i], "hook_head_index_out": None}
    return {SAELENS_CFG: json.dumps(cfg, indent=2), SAELENS_WEIGHTS: tensors}


def unit_norm_scale(W_dec: Tensor, act: str, d: HookedDictionary) -> Tensor:
    """[F] decoder row norms (W_dec [F, D]), to be folded into the encoder side so the exported rows have norm 1, as
    SAELens-based tools assume (SAEBench's absorption reads cosines and magnitudes off W_dec; it moved
    10x on rows left at the folded normalisation's norm). Exact for ReLU / JumpReLU (positively
    homogeneous, thresholds scaled alike) and for TopK when every row has the same norm (the selection
    is unchanged); a dead latent's zero row stays zero."""
    norms = W_dec.norm(dim=-1)
    if act == "topk" and norms.max() - norms.min() > UNIFORM_NORM_RTOL * norms.max():
        raise UsageError(f"SAELens' TopK has no per-latent scale, and {d.path}'s decoder rows differ in norm "
                         f"({norms.min():.3g}..{norms.max():.3g}): unit rows would change which latents fire; "
                         f"{convert_hint([d], [d])}")
    return torch.where(norms > 0, norms, torch.ones_like(norms))


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
