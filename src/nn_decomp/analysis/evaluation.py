"""Evaluate trained dictionaries on held-out text (`python -m nn_decomp.evaluate`, experiments).

Writes `eval.json` and `feature_density.png` into the checkpoint dir (or `out=DIR`) and prints a
table. For a set of per-layer transcoders pass `checkpoints=[A,B,...]` and `out=DIR`.

Metrics (all on the held-out documents of the checkpoint's data config, BOS/EOS/pad positions left
out and left unpatched):
- reconstruction, from clean activations: MSE, NMSE (= FVU, centred, see NMSE_DEFINITION),
  explained variance, cosine similarity, per layer;
- sparsity: L0 per source layer, fraction of latents dead (never fired in the window) or dense
  (fired on > eval.dense_threshold of tokens), and a log10 feature-density histogram;
- downstream, which needs the full LM: clean CE; per covered layer, CE with that layer's output
  spliced, zero-ablated and mean-ablated, CE loss recovered against each ablation and
  KL(clean ‖ spliced); and the all-layers replacement model (every covered output replaced at once,
  each layer encoded from the patched stream; a crosscoder's from the clean one, patching.py): CE,
  KL, top-1 agreement with the clean model, each with its standard error clustered by context, and
  each context's sums (`per_context`), for `paired_difference` of two models on the same tokens.

`evaluate(cfg)` is the plain function the command, tests and experiments call.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from omegaconf import DictConfig
from torch import Tensor
from tqdm import tqdm

from nn_decomp.analysis.metrics import (CE_RECOVERED_DEFINITION, KL_DEFINITION, NMSE_DEFINITION, POSITIONS,
                                        REPLACEMENT_METRICS, STDERR_DEFINITION, DownstreamStats, ReconstructionStats,
                                        ce_recovered)
from nn_decomp.analysis.patching import patched
from nn_decomp.config import UsageError, check_command
from nn_decomp.data.heldout import excluded_token_ids, heldout_contexts, text_config
from nn_decomp.data.hooks import hook_layer
from nn_decomp.dictionaries import (HookedDictionary, check_compatible, check_model_choice, checkpoint_list,
                                    load_dictionaries)
from nn_decomp.runtime.checkpoint import read_config
from nn_decomp.runtime.files import refuse_existing, replacing, write_atomic

if TYPE_CHECKING:  # the LM stack (transformer_lens, datasets) is imported where it is used, so that
    from transformer_lens import HookedTransformer  # bad-input errors come fast

EVAL_JSON, DENSITY_PNG = "eval.json", "feature_density.png"


@torch.no_grad()
def mean_activations(model: HookedTransformer, contexts_CT: Tensor, hooks: list[str], exclude_ids: list[int],
                     batch_contexts: int) -> dict[str, Tensor]:
    """{hook: [D]} mean activation over the scored (non-excluded) positions: the mean-ablation value."""
    sums, n = {}, 0
    stop = max(hook_layer(h) for h in hooks) + 1
    for tokens_BT in contexts_CT.split(batch_contexts):
        tokens_BT = tokens_BT.to(model.cfg.device)
        keep_BT = ~torch.isin(tokens_BT, torch.tensor(exclude_ids, device=tokens_BT.device))
        _, cache = model.run_with_cache(tokens_BT, names_filter=hooks, stop_at_layer=stop)
        for h in hooks:
            sums[h] = sums.get(h, 0) + cache[h][keep_BT].double().sum(0)
        n += int(keep_BT.sum())
    return {h: (s / n).float() for h, s in sums.items()}


def covered_layers(dictionaries: list[HookedDictionary]) -> list[tuple[HookedDictionary, int]]:
    return [(d, layer) for d in dictionaries for layer in d.layers]


class Evaluation(NamedTuple):
    """metrics: JSON-ready (see the module docstring); fires: per dictionary, [L, F] number of
    evaluated tokens each latent fired on."""

    metrics: dict
    fires: list[Tensor]


@torch.no_grad()
def evaluate_dictionaries(model: HookedTransformer, dictionaries: list[HookedDictionary], contexts_CT: Tensor,
                          exclude_ids: list[int], batch_contexts: int = 8, dense_threshold: float = 0.1,
                          downstream: bool = True, per_layer: bool = True) -> Evaluation:
    """All metrics for `dictionaries` (one, or per-layer transcoders) on `contexts_CT`; per_layer=False
    leaves out the splices and ablations of each layer alone (one covered layer: it is the replacement)."""
    device = model.cfg.device
    for d in dictionaries:
        d.coder.eval()
    hooks = sorted({h for d in dictionaries for h in d.hooks_in + d.hooks_out})
    outs = [h for d in dictionaries for h in d.hooks_out]
    recon = [ReconstructionStats(d.coder.n_layers, d.coder.n_sources, d.coder.n_latents, d.coder.d_out, device)
             for d in dictionaries]
    down = DownstreamStats(len(contexts_CT))
    means = mean_activations(model, contexts_CT, outs, exclude_ids, batch_contexts) if downstream else None
    targets = covered_layers(dictionaries)
    exclude = torch.tensor(exclude_ids, device=device)
    for first in tqdm(range(0, len(contexts_CT), batch_contexts), desc="eval", mininterval=5):
        tokens_BT = contexts_CT[first:first + batch_contexts].to(device)
        keep_BT = ~torch.isin(tokens_BT, exclude)
        stop = None if downstream else max(hook_layer(h) for h in hooks) + 1
        logits, cache = model.run_with_cache(tokens_BT, names_filter=hooks, stop_at_layer=stop)
        for d, stats in zip(dictionaries, recon):
            x_NLD = torch.stack([cache[h] for h in d.hooks_in], 2)[keep_BT].to(d.coder.W_enc.dtype)
            y_NLD = torch.stack([cache[h] for h in d.hooks_out], 2)[keep_BT].to(d.coder.W_enc.dtype)
            out = d.coder(x_NLD)
            stats.update(y_NLD, out.recon, out.latents)
        if not downstream:
            continue
        scored_BT = keep_BT[:, :-1]
        targets_N = tokens_BT[:, 1:][scored_BT]
        context_N = (first + torch.arange(len(tokens_BT), device=device))[:, None].expand_as(scored_BT)[scored_BT]

        def logp(logits_BTV: Tensor) -> Tensor:
            return torch.log_softmax(logits_BTV[:, :-1][scored_BT].float(), dim=-1)

        logp_clean = logp(logits)
        del logits
        down.add_clean(logp_clean, targets_N, context_N)
        settings = [(f"{mode}/{layer}", [d], mode, [layer]) for d, layer in targets for mode in ("splice", "zero", "mean")
                    if per_layer or len(targets) == 1]
        if len(targets) > 1:
            settings += [(f"{mode}/all", dictionaries, mode, None) for mode in ("splice", "zero", "mean")]
        for name, ds, mode, layers in settings:
            with patched(model, ds, mode, layers=layers, means=means, positions_BT=keep_BT, clean=cache):
                down.add(name, logp_clean, logp(model(tokens_BT)), targets_N, context_N)
    metrics = summarise(dictionaries, recon, down if downstream else None, dense_threshold)
    return Evaluation(metrics, [s.fires_LF for s in recon])


def summarise(dictionaries: list[HookedDictionary], recon: list[ReconstructionStats],
              down: DownstreamStats | None, dense_threshold: float) -> dict:
    per_layer: dict[str, list[float]] = {}
    for stats in recon:
        for key, values in stats.metrics(dense_threshold).items():
            per_layer.setdefault(key, []).extend(values)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    n_latents = [d.coder.n_latents * d.coder.n_sources for d in dictionaries]
    fires = torch.cat([s.fires_LF.flatten() for s in recon])
    result = {
        "n_tokens": recon[0].n, "nmse_definition": NMSE_DEFINITION, "positions": POSITIONS,
        "nmse": mean(per_layer["nmse"]), "explained_variance": mean(per_layer["explained_variance"]),
        "mse": mean(per_layer["mse"]), "cosine": mean(per_layer["cosine"]),
        "l0": sum(per_layer["l0"]),
        "dead_fraction": float((fires == 0).double().mean()),
        "dense_fraction": float((fires.double() / recon[0].n > dense_threshold).double().mean()),
        "dense_threshold": dense_threshold, "n_latents_total": sum(n_latents),
        "parameters": sum(p.numel() for d in dictionaries for p in d.coder.parameters()),
        "decoder_parameters": sum(p.numel() for d in dictionaries for p in d.coder.decoder_weights()),
        # Σ over latents of (fraction of tokens it fired on) × (decoder parameters it uses)
        "active_decoder_parameters": sum(float((s.fires_LF.double() / s.n * d.coder.decoder_params().to(s.fires_LF.device)).sum())
                                         for d, s in zip(dictionaries, recon)),
    }
    result |= {f"{k}_per_layer": v for k, v in per_layer.items()}
    if down is not None:
        result |= downstream_summary(dictionaries, down)
    return result


def downstream_summary(dictionaries: list[HookedDictionary], down: DownstreamStats) -> dict:
    ce_clean = down.mean("clean", "ce")
    layers = [layer for _, layer in covered_layers(dictionaries)]
    per = {k: [] for k in ("ce_spliced", "ce_zero_ablated", "ce_mean_ablated", "ce_recovered_zero",
                           "ce_recovered_mean", "kl_spliced", "top1_agreement_spliced")}
    for layer in (layer for layer in layers if f"splice/{layer}" in down.sums):  # eval.per_layer=false: none
        ce, zero, mean = (down.mean(f"{m}/{layer}", "ce") for m in ("splice", "zero", "mean"))
        per["ce_spliced"].append(ce)
        per["ce_zero_ablated"].append(zero)
        per["ce_mean_ablated"].append(mean)
        per["ce_recovered_zero"].append(ce_recovered(ce_clean, ce, zero))
        per["ce_recovered_mean"].append(ce_recovered(ce_clean, ce, mean))
        per["kl_spliced"].append(down.mean(f"splice/{layer}", "kl"))
        per["top1_agreement_spliced"].append(down.mean(f"splice/{layer}", "top1_agreement"))
    key = "all" if len(layers) > 1 else layers[0]  # one layer: the replacement model is the splice
    ce_rep, zero_all, mean_all = (down.mean(f"{m}/{key}", "ce") for m in ("splice", "zero", "mean"))
    avg = lambda xs: sum(xs) / len(xs)  # noqa: E731
    rep = f"splice/{key}"
    return {
        "ce_recovered_definition": CE_RECOVERED_DEFINITION, "kl_definition": KL_DEFINITION,
        "stderr_definition": STDERR_DEFINITION, "n_scored_tokens": int(down.n_C.sum()), "ce_clean": ce_clean,
        **{k: avg(v) for k, v in per.items() if v},
        **{f"{k}_per_layer": v for k, v in per.items() if v},
        **{f"replacement_{m}": down.mean(rep, m) for m in REPLACEMENT_METRICS},
        **{f"replacement_{m}_stderr": down.stderr(rep, m) for m in REPLACEMENT_METRICS},
        "ce_clean_stderr": down.stderr("clean", "ce"),
        # per-context sums: two models evaluated on the same contexts compare pairwise (paired_difference)
        "per_context": {"n_scored_tokens": down.n_C.tolist(), "ce_clean": down.sums["clean"]["ce"].tolist(),
                        **{f"replacement_{m}": down.sums[rep][m].tolist() for m in REPLACEMENT_METRICS}},
        "replacement_ce_zero_ablated": zero_all, "replacement_ce_mean_ablated": mean_all,
        "replacement_ce_recovered_zero": ce_recovered(ce_clean, ce_rep, zero_all),
        "replacement_ce_recovered_mean": ce_recovered(ce_clean, ce_rep, mean_all),
    }


# --- outputs ---------------------------------------------------------------------------------

def plot_density(dictionaries: list[HookedDictionary], result: dict, fires: list[Tensor], path: Path) -> None:
    """Histogram of log10(fraction of tokens each latent fires on); dead latents counted in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    density = torch.cat([f.flatten() for f in fires]).double() / result["n_tokens"]
    alive = density[density > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(alive):
        ax.hist(alive.log10().cpu().numpy(), bins=50)
    ax.axvline(math.log10(result["dense_threshold"]), color="red", linestyle="--",
               label=f"dense (> {result['dense_threshold']:g})")
    ax.set_xlabel("log10(feature density)")
    ax.set_ylabel("latents")
    name = ", ".join(str(d.path) for d in dictionaries)
    ax.set_title(f"{name[-60:]}\n{int((density == 0).sum())} of {len(density)} latents dead "
                 f"in {result['n_tokens']} tokens", fontsize=8)
    ax.legend()
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def table(result: dict) -> str:
    cols = [("layer", "layers", "{}"), ("nmse", "nmse_per_layer", "{:.4f}"), ("ev", "explained_variance_per_layer", "{:.4f}"),
            ("cos", "cosine_per_layer", "{:.4f}"), ("l0", "l0_per_layer", "{:.1f}"), ("dead", "dead_fraction_per_layer", "{:.3f}"),
            ("dense", "dense_fraction_per_layer", "{:.3f}"), ("ce_splice", "ce_spliced_per_layer", "{:.4f}"),
            ("rec_zero", "ce_recovered_zero_per_layer", "{:.4f}"), ("rec_mean", "ce_recovered_mean_per_layer", "{:.4f}"),
            ("kl", "kl_spliced_per_layer", "{:.4f}")]
    # a crosscoder's sparsity columns have one source, not one per layer: its totals line shows them
    cols = [c for c in cols if len(result.get(c[1], ())) == len(result["layers"])]
    rows = [[fmt.format(v) for v in result[key]] for _, key, fmt in cols]
    widths = [max(len(name), *(len(v) for v in col)) for (name, _, _), col in zip(cols, rows)]
    lines = ["  ".join(name.rjust(w) for (name, _, _), w in zip(cols, widths))]
    lines += ["  ".join(col[i].rjust(w) for col, w in zip(rows, widths)) for i in range(len(result["layers"]))]
    lines.append(f"nmse {result['nmse']:.4f} (FVU, centred)  l0 {result['l0']:.1f}  dead {result['dead_fraction']:.3f}  "
                 f"dense {result['dense_fraction']:.3f}  tokens {result['n_tokens']}")
    if "ce_clean" in result:
        lines.append(f"CE clean {result['ce_clean']:.4f}  replacement {result['replacement_ce']:.4f} "
                     f"(KL {result['replacement_kl']:.4f}, top-1 {result['replacement_top1_agreement']:.3f}, "
                     f"recovered zero {result['replacement_ce_recovered_zero']:.4f} / mean "
                     f"{result['replacement_ce_recovered_mean']:.4f})")
    return "\n".join(lines)


def evaluate(cfg: DictConfig, model: HookedTransformer | None = None) -> dict:
    """Evaluate the checkpoint(s) `cfg` names; writes eval.json + feature_density.png, returns the
    metrics. `model` replaces the LM the checkpoint names (tests pass a tiny one)."""
    check_command(cfg)
    paths = checkpoint_list(cfg)
    if len(paths) > 1 and not cfg.out:
        raise UsageError("several checkpoints: pass out=DIR for their eval.json")
    dictionaries = load_dictionaries(paths)
    model_name = check_model_choice(cfg, dictionaries)
    out_dir = Path(cfg.out) if cfg.out else paths[0]
    refuse_existing([out_dir / EVAL_JSON, out_dir / DENSITY_PNG], cfg.overwrite)
    ckpt_cfg, meta = read_config(dictionaries[0].path)
    text_cfg = text_config(ckpt_cfg, meta)
    if model is None:
        from nn_decomp.models import load_model  # transformer_lens: seconds, after the input checks

        model = load_model(model_name, cfg.device, cfg.dtype, first_n_layers=None, cache_dir=cfg.cache_dir)
    for d in dictionaries:
        d.coder.to(model.cfg.device)
    check_compatible(model, dictionaries)
    exclude_ids = excluded_token_ids(model.tokenizer)
    ev = cfg.eval
    context_size = ev.context_size or text_cfg.data.context_size
    if context_size > model.cfg.n_ctx:
        raise UsageError(f"contexts of {context_size} tokens exceed {model.cfg.model_name}'s n_ctx={model.cfg.n_ctx}: "
                         f"pass eval.context_size={model.cfg.n_ctx}")
    contexts = heldout_contexts(text_cfg, model.tokenizer, ev.n_tokens, context_size)
    result, fires = evaluate_dictionaries(model, dictionaries, contexts, exclude_ids, ev.batch_contexts,
                                          ev.dense_threshold, ev.downstream, ev.per_layer)
    result = {"checkpoints": [str(d.path) for d in dictionaries], "model": model_name,
              "arch": meta["arch"] if len(dictionaries) == 1 else f"{meta['arch']}_set",
              "act": meta["act"], "layers": [layer for d in dictionaries for layer in d.layers],
              "hooks_in": [h for d in dictionaries for h in d.hooks_in],
              "hooks_out": [h for d in dictionaries for h in d.hooks_out],
              "n_contexts": len(contexts), "context_size": contexts.shape[1],
              "excluded_token_ids": exclude_ids} | result
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_density(dictionaries, result, fires, out_dir / DENSITY_PNG)
    result["density_histogram"] = str(out_dir / DENSITY_PNG)
    write_atomic(out_dir / EVAL_JSON, json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {out_dir / EVAL_JSON}")
    return result
