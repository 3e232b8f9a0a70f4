"""Turn a TopK / BatchTopK dictionary into a JumpReLU one (what circuit-tracer and SAELens transcoders
run): `python -m nn_decomp.convert`.

The weights are kept; only the activation changes, to pre·H(pre − θ_f) with one threshold per latent
and layer. Thresholds come from the source dictionary's own behaviour on held-out tokens (the first
`n_tokens` of the checkpoint's held-out documents), by one of two estimators:

- estimator=rate (default): θ_f is the value that latent f's pre-activation exceeds on exactly as
  many tokens as the source activation selects f (the (n_f+1)-th largest pre-activation of f). Each
  latent keeps its firing frequency, so the L0 matches the source's on these tokens by construction.
- estimator=min: θ_f is the smallest pre-activation at which the source selected f (the per-latent
  analogue of the BatchTopK paper's threshold, the mean over batches of the minimum selected
  activation). Latents fire at least as often as before, so L0 rises; calibrate=true corrects it,
  but badly: a few latents selected once at a near-zero value fire almost everywhere, and one
  multiplicative scale per layer must then raise every other threshold far above its value
  (SmolLM2 layer-2 TopK transcoder, k=32: rate gives NMSE 0.0222 → 0.0240 at L0 30.9 → 31.2;
  min gives 0.0251 at L0 38.9, min + calibrate 0.103 at L0 31.4).

A latent never selected gets θ_f = its largest pre-activation seen (it stays silent on those tokens).
calibrate=true then bisects one scale c per layer (thresholds c·θ) until the layer's L0 on the same
tokens equals the source's. Before/after NMSE and L0 are measured on the next `n_eval_tokens`
held-out tokens (disjoint from the fitting tokens), written into the new checkpoint's metadata.json
and printed.
"""
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from nn_decomp.config import UsageError, check_command
from nn_decomp.config.act import JumpReLUConfig
from nn_decomp.core.coder import SparseCoder
from nn_decomp.data.heldout import heldout_activations, text_config
from nn_decomp.dictionaries import (HookedDictionary, check_compatible, check_model_choice, checkpoint_list,
                                   load_dictionaries)
from nn_decomp.runtime.checkpoint import build_coder, read_config, save_checkpoint
from nn_decomp.runtime.files import refuse_existing
from nn_decomp.runtime.trainer import evaluate_coder, pick_layers
from nn_decomp.runtime.training import stream_config, stream_index

CONVERTIBLE = ("topk", "batchtopk")
MIN_THRESHOLD = 1e-6  # JumpReLU stores log θ, so θ > 0; a latent active on most tokens would get θ ≤ 0


# --- threshold estimators --------------------------------------------------------------------

def rate_thresholds(pre_NF: Tensor, active_NF: Tensor, chunk: int = 1024) -> Tensor:
    """[F] θ_f = the (n_f+1)-th largest pre-activation of latent f, n_f = tokens f is active on:
    exactly n_f tokens exceed it (ties aside)."""
    N = pre_NF.shape[0]
    n_F = active_NF.sum(0)
    out = []
    for start in range(0, pre_NF.shape[1], chunk):
        sorted_NF = pre_NF[:, start:start + chunk].sort(dim=0).values  # ascending
        rank_F = (N - 1 - n_F[start:start + chunk]).clamp(min=0)
        theta_F = sorted_NF.gather(0, rank_F[None]).squeeze(0)
        # Never active: the largest value seen (strict >, so it stays silent on these tokens).
        out.append(torch.where(n_F[start:start + chunk] == 0, sorted_NF[-1], theta_F))
    return torch.cat(out)


def min_thresholds(pre_NF: Tensor, active_NF: Tensor) -> Tensor:
    """[F] θ_f = the smallest pre-activation at which f was active, minus nothing: pre > θ then
    excludes that token itself, so step down by one ulp to keep it."""
    smallest_F = pre_NF.masked_fill(~active_NF, float("inf")).amin(0)
    never = torch.isinf(smallest_F)
    theta_F = torch.nextafter(smallest_F, torch.full_like(smallest_F, -float("inf")))
    return torch.where(never, pre_NF.amax(0), theta_F)


def calibrate_scale(pre_NF: Tensor, theta_F: Tensor, target_l0: float, n_iter: int = 50) -> float:
    """Bisection on log c so that mean_t #{f: pre_tf > c·θ_f} = target_l0 (L0 falls as c grows)."""
    def l0(c: float) -> float:
        return (pre_NF > c * theta_F).sum().item() / len(pre_NF)

    lo, hi = -10.0, 10.0  # log c
    for _ in range(n_iter):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if l0(torch.tensor(mid).exp().item()) > target_l0 else (lo, mid)
    return torch.tensor((lo + hi) / 2).exp().item()


@torch.no_grad()
def fit_thresholds(coder: SparseCoder, x_NLD: Tensor, estimator: str, calibrate: bool) -> tuple[Tensor, dict]:
    """[L, F] thresholds and per-layer fit statistics (source L0, JumpReLU L0, calibration scale)."""
    thresholds, stats = [], {"source_l0": [], "jumprelu_l0": [], "scale": []}
    x_NSD = coder.stacked(x_NLD)  # a crosscoder's one source reads its layers side by side
    for i in range(coder.n_sources):
        x_ND = x_NSD[:, i]
        pre_NF = coder.layer_pre(x_ND, i)
        active_NF = coder.encode_layer(x_ND, i).dense()[:, 0] != 0
        target = active_NF.sum().item() / len(x_ND)
        theta_F = (rate_thresholds if estimator == "rate" else min_thresholds)(pre_NF, active_NF)
        theta_F = theta_F.clamp(min=MIN_THRESHOLD)
        scale = calibrate_scale(pre_NF, theta_F, target) if calibrate else 1.0
        theta_F = (scale * theta_F).clamp(min=MIN_THRESHOLD)
        thresholds.append(theta_F)
        stats["source_l0"].append(target)
        stats["jumprelu_l0"].append((pre_NF > theta_F).sum().item() / len(x_ND))
        stats["scale"].append(scale)
    return torch.stack(thresholds), stats


def jumprelu_coder(source: SparseCoder, ckpt_cfg: DictConfig, thresholds_LF: Tensor) -> tuple[SparseCoder, DictConfig]:
    """A JumpReLU coder with the source's weights and the given thresholds, and its config."""
    cfg = ckpt_cfg.copy()
    # a token-normalising source (BatchTopK's default) keeps normalising: its pre-activations, and so
    # the fitted thresholds, live in that space (coder.layer_pre normalises as forward does)
    cfg.act = OmegaConf.structured(JumpReLUConfig(token_norm=source.activation.token_norm))
    coder = build_coder(cfg, source.d_in, source.d_out).to(thresholds_LF.device)
    weights = {k: v for k, v in source.state_dict().items() if not k.startswith("activation.")}
    weights["activation.log_threshold"] = thresholds_LF.log().float()
    coder.load_state_dict(weights)
    return coder.eval(), cfg


def converted_path(checkpoint: Path) -> Path:
    """Where convert writes `checkpoint`'s JumpReLU unless given out=."""
    return checkpoint.with_name(checkpoint.name + "_jumprelu")


def convert(cfg: DictConfig, model=None) -> list[dict]:
    """Convert the checkpoint(s) `cfg` names; returns each one's before/after report. A set
    (`checkpoints=[...]`, e.g. a transcoder per layer) is fitted from one LM pass over the held-out
    text of every layer it covers, each written next to its source as <checkpoint>_jumprelu."""
    check_command(cfg)
    paths = checkpoint_list(cfg)
    if len(paths) > 1 and cfg.out:
        raise UsageError("out= names one converted checkpoint: drop it for a set (each is written next to its "
                         "source as <checkpoint>_jumprelu) or convert one checkpoint=PATH at a time")
    dictionaries = load_dictionaries(paths)
    configs = [read_config(d.path) for d in dictionaries]
    for d, (_, meta) in zip(dictionaries, configs):
        if meta["act"] not in CONVERTIBLE:
            raise UsageError(f"{d.path} has act={meta['act']}; convert works on {'/'.join(CONVERTIBLE)} "
                             "(a jumprelu or relu dictionary exports as it is)")
    outs = [Path(cfg.out) if cfg.out else converted_path(d.path) for d in dictionaries]
    refuse_existing(outs, cfg.overwrite)
    texts = [text_config(ckpt_cfg, meta) for ckpt_cfg, meta in configs]
    stream = heldout_stream(texts, dictionaries)
    model_name = check_model_choice(cfg, dictionaries)
    if model is None:
        from nn_decomp.models import load_model  # transformer_lens: seconds, after the input checks

        model = load_model(model_name, cfg.device, cfg.dtype, max(stream.arch.layers) + 1, cfg.cache_dir)
    check_compatible(model, dictionaries)
    (x_fit, _), (x_eval, y_eval) = heldout_activations(stream, model, model.cfg.device, cfg.n_tokens,
                                                       cfg.n_eval_tokens)
    reports = []
    for d, (ckpt_cfg, meta), text, out in zip(dictionaries, configs, texts, outs):
        index = stream_index(text, stream)
        rows = [pick_layers(x, index) for x in (x_fit, x_eval, y_eval)]
        reports.append(convert_one(cfg, d, ckpt_cfg, meta, out, *rows))
        print(table(reports[-1]))
    return reports


def heldout_stream(texts: list[DictConfig], dictionaries: list[HookedDictionary]) -> DictConfig:
    """The config whose held-out stream holds every layer of the set: one text, seed and hook pair."""
    for key in ("data", "train.seed", "train.batch_size", "arch.hook_in", "arch.hook_out"):
        values = {json.dumps(OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(t, key)}),
                                                    resolve=True)) for t in texts}
        if len(values) > 1:
            raise UsageError(f"these checkpoints differ in {key} ({', '.join(str(d.path) for d in dictionaries)}): "
                             "convert a set trained on one text with one seed and hook pair, or each on its own")
    return stream_config(texts)


def convert_one(cfg: DictConfig, d: HookedDictionary, ckpt_cfg: DictConfig, meta: dict, out: Path, x_fit: Tensor,
                x_eval: Tensor, y_eval: Tensor) -> dict:
    """Fit `d`'s thresholds on x_fit, write the JumpReLU checkpoint to `out`; the report."""
    source = d.coder.to(x_fit.device)
    thresholds, fit = fit_thresholds(source, x_fit.to(source.W_enc.dtype), cfg.estimator, cfg.calibrate)
    coder, new_cfg = jumprelu_coder(source, ckpt_cfg, thresholds)
    batch = ckpt_cfg.train.batch_size
    before = evaluate_coder(source, x_eval, y_eval, batch)
    after = evaluate_coder(coder, x_eval, y_eval, batch)
    report = {"source": str(d.path), "out": str(out), "estimator": cfg.estimator, "calibrate": cfg.calibrate,
              "n_fit_tokens": len(x_fit), "n_eval_tokens": len(x_eval), "fit": fit, "before": before, "after": after}
    new_meta = meta | {"act": "jumprelu", "eval": after, "converted_from": report}
    for key in ("step", "tokens_seen"):
        new_meta.pop(key, None)
    save_checkpoint(out, coder.cpu(), new_cfg, new_meta)
    return report


def table(report: dict) -> str:
    b, a = report["before"], report["after"]
    rows = [("", "source", "jumprelu"), ("nmse", f"{b['nmse']:.4f}", f"{a['nmse']:.4f}"),
            ("explained_variance", f"{b['explained_variance']:.4f}", f"{a['explained_variance']:.4f}"),
            ("l0", f"{b['l0']:.2f}", f"{a['l0']:.2f}"),
            ("dead_fraction_eval", f"{b['dead_fraction_eval']:.3f}", f"{a['dead_fraction_eval']:.3f}")]
    lines = [f"{r[0]:>20}  {r[1]:>10}  {r[2]:>10}" for r in rows]
    lines.append(f"estimator={report['estimator']} calibrate={report['calibrate']}; fit on "
                 f"{report['n_fit_tokens']} held-out tokens, measured on the next {report['n_eval_tokens']}")
    lines.append(f"wrote {report['out']}")
    return "\n".join(lines)
