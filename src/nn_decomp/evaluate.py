"""`python -m nn_decomp.evaluate checkpoint=PATH`: evaluate a dictionary on held-out text.

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

`evaluate(cfg)` is the plain function tests call; `main` only adds Hydra.
"""
from __future__ import annotations

import json
import math
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

import nn_decomp.config  # noqa: F401  (registers base_evaluate and the model schemas `model=<option>` composes)
from nn_decomp.core.activations import Latents
from nn_decomp.runtime.checkpoint import read_config
from nn_decomp.config import UsageError
from nn_decomp.runtime.files import refuse_existing, replacing, write_atomic
from nn_decomp.runtime.jobs import exit_on_usage_error
from nn_decomp.analysis.patching import HookedDictionary, check_disjoint_outputs, patched

if TYPE_CHECKING:  # the LM stack (transformer_lens, datasets) is imported where it is used, so that
    from transformer_lens import HookedTransformer  # bad-input errors and export stay fast

EVAL_JSON, DENSITY_PNG = "eval.json", "feature_density.png"
NMSE_DEFINITION = (
    "NMSE = FVU = Σ‖y−ŷ‖² / Σ‖y−ȳ‖² over held-out tokens, ȳ the per-dimension mean over those tokens "
    "(centred: predicting ȳ scores 1). Per target layer; `nmse` is the mean over layers.")
CE_RECOVERED_DEFINITION = (
    "(CE_ablated − CE_patched) / (CE_ablated − CE_clean). *_zero: hook_out ablated to 0; *_mean: "
    "to its mean over the held-out tokens. 1 = as good as the clean model, 0 = no better than ablating.")
KL_DEFINITION = "KL(clean ‖ patched) of next-token distributions, nats per scored token."
STDERR_DEFINITION = ("*_stderr: standard error of the mean over scored tokens, clustered by context (the contexts "
                     "are the independent samples); per_context: each context's sums, for paired comparisons.")
REPLACEMENT_METRICS = ("ce", "kl", "top1_agreement")
POSITIONS = ("Scored positions: every token but BOS/EOS/pad ones (and the last of each context); "
             "those positions are also left unpatched.")


# --- loading and checks ----------------------------------------------------------------------

def checkpoint_list(cfg: DictConfig) -> list[Path]:
    paths = ([cfg.checkpoint] if cfg.checkpoint else []) + list(cfg.get("checkpoints") or [])
    if not paths:
        raise UsageError("no checkpoint given: pass checkpoint=PATH (or checkpoints=[PATH,...] for a transcoder set)")
    return [Path(p) for p in paths]


def load_dictionaries(paths: list[Path], device: str | torch.device = "cpu") -> list[HookedDictionary]:
    """Load every checkpoint, sorted by first layer; all must come from one model and write
    distinct hooks."""
    dictionaries = []
    for path in paths:
        try:
            dictionaries.append(HookedDictionary.load(path, device))
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
    models = {d.model_name for d in dictionaries}
    if len(models) > 1:
        raise UsageError(f"checkpoints come from different models {sorted(models)}; pass checkpoints of one model")
    if len(dictionaries) > 1 and any(d.coder.n_layers > 1 for d in dictionaries):
        raise UsageError("a CLT or crosscoder already covers several layers: pass it alone as checkpoint=PATH")
    try:
        check_disjoint_outputs(dictionaries)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return sorted(dictionaries, key=lambda d: d.layers[0])


def check_model_choice(cfg: DictConfig, dictionaries: list[HookedDictionary]) -> str:
    """The model to load: the checkpoints'; a `model=` choice must agree with it."""
    trained_on = dictionaries[0].model_name
    chosen = cfg.model.name if cfg.get("model") else None
    if chosen is not None and chosen != trained_on:
        raise UsageError(f"{dictionaries[0].path} was trained on model {trained_on!r}, not {chosen!r}: "
                         f"drop model= (or pass model={trained_on}) or pass a checkpoint trained on {chosen!r}")
    return trained_on


@torch.no_grad()
def check_compatible(model: HookedTransformer, dictionaries: list[HookedDictionary]) -> None:
    """Every hook exists in `model` and has the width the dictionary was trained on."""
    from nn_decomp.data.store import check_hooks, hook_layer

    hooks = sorted({h for d in dictionaries for h in d.hooks_in + d.hooks_out})
    try:
        check_hooks(model, hooks)
    except UsageError as e:
        raise UsageError(f"{e}: the checkpoint was trained on another model; evaluate it with that one") from None
    stop = max(hook_layer(h) for h in hooks) + 1
    _, cache = model.run_with_cache(torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device),
                                    names_filter=hooks, stop_at_layer=stop)
    for d in dictionaries:
        for hooks_d, width in ((d.hooks_in, d.coder.d_in), (d.hooks_out, d.coder.d_out)):
            for h in hooks_d:
                if cache[h].shape[-1] != width:
                    raise UsageError(f"{d.path} expects width {width} at {h} but {model.cfg.model_name} has "
                                     f"{cache[h].shape[-1]}: it was trained on another model")


def excluded_token_ids(tokenizer) -> list[int]:
    """BOS, EOS and pad: the tokens the training store drops."""
    ids = (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
    return sorted({t for t in ids if t is not None})


def text_config(ckpt_cfg: DictConfig, meta: dict) -> DictConfig:
    """The checkpoint's config with `data` naming the text it was trained on: for a run on an
    activation cache (data=cache), the text that cache was built from."""
    if ckpt_cfg.data.source != "cache":
        return ckpt_cfg
    if "cache" not in meta:
        raise UsageError("the checkpoint was trained on an activation cache but its metadata.json does not say "
                         "which text the cache came from; retrain, or add metadata['cache']['text_source']")
    cfg = ckpt_cfg.copy()
    cfg.data = OmegaConf.create(meta["cache"]["text_source"])
    return cfg


def heldout_contexts(ckpt_cfg: DictConfig, tokenizer, n_tokens: int, context_size: int | None = None) -> Tensor:
    """[C, T] token ids from the documents the checkpoint's run held out (data.eval_fraction,
    train.seed), packed as in training (T = context_size or data.context_size); as many contexts as
    n_tokens needs, in document order."""
    from nn_decomp.data.text import load_texts, split_documents, token_contexts

    data = ckpt_cfg.data
    context_size = context_size or data.context_size
    texts = load_texts(data.source, data.path, data.name, data.split, data.column, data.streaming)
    eval_texts = split_documents(texts, data.eval_fraction, ckpt_cfg.train.seed)[1]
    n_contexts = math.ceil(n_tokens / context_size)
    contexts = list(islice(token_contexts((row[data.column] for row in eval_texts), tokenizer,
                                          context_size, data.prepend_bos), n_contexts))
    if not contexts:
        raise UsageError("the held-out split has no full context: lower data.context_size or raise data.eval_fraction")
    return torch.stack(contexts)


# --- metrics ---------------------------------------------------------------------------------

class ReconstructionStats:
    """Running sums over tokens for one dictionary (float64), turned into per-layer metrics."""

    def __init__(self, n_layers: int, n_sources: int, n_latents: int, d_out: int, device):
        """Reconstruction per target layer (n_layers), sparsity per source (n_sources: 1 for a crosscoder)."""
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.sse_L, self.sum_y2_L, self.sum_r2_L = (torch.zeros(n_layers, **f64) for _ in range(3))
        self.sum_y_LD, self.sum_r_LD = torch.zeros(n_layers, d_out, **f64), torch.zeros(n_layers, d_out, **f64)
        self.cos_L, self.l0_L = torch.zeros(n_layers, **f64), torch.zeros(n_sources, **f64)
        self.fires_LF = torch.zeros(n_sources, n_latents, dtype=torch.long, device=device)

    def update(self, y_NLD: Tensor, recon_NLD: Tensor, latents: Latents) -> None:
        y, r = y_NLD.double(), (y_NLD - recon_NLD).double()
        self.n += len(y)
        self.sse_L += r.pow(2).sum((0, 2))
        self.sum_y_LD += y.sum(0)
        self.sum_y2_L += y.pow(2).sum((0, 2))
        self.sum_r_LD += r.sum(0)
        self.sum_r2_L += r.pow(2).sum((0, 2))
        self.cos_L += torch.cosine_similarity(y_NLD, recon_NLD, dim=-1).double().sum(0)
        fired_NLF = latents.dense() != 0
        self.l0_L += fired_NLF.sum((0, 2)).double()
        self.fires_LF += fired_NLF.sum(0)

    def metrics(self, dense_threshold: float) -> dict[str, list[float]]:
        n = self.n
        total_L = self.sum_y2_L - self.sum_y_LD.pow(2).sum(-1) / n  # Σ‖y−ȳ‖²
        resid_var_L = self.sum_r2_L - self.sum_r_LD.pow(2).sum(-1) / n  # Σ‖r−r̄‖²
        density_LF = self.fires_LF.double() / n
        as_list = lambda t: [float(v) for v in t]  # noqa: E731
        return {"mse": as_list(self.sse_L / (n * self.sum_y_LD.shape[-1])),
                "nmse": as_list(self.sse_L / total_L),
                "explained_variance": as_list(1 - resid_var_L / total_L),
                "cosine": as_list(self.cos_L / n),
                "l0": as_list(self.l0_L / n),
                "dead_fraction": as_list((self.fires_LF == 0).double().mean(-1)),
                "dense_fraction": as_list((density_LF > dense_threshold).double().mean(-1))}


def clustered_stderr(sums_C: Tensor, n_C: Tensor) -> float:
    """Standard error of the per-token mean Σ sums / Σ n when tokens come in clusters (contexts): the
    tokens of one context are not independent, so the clusters are the samples (the ratio
    estimator's sandwich form, with the C/(C−1) correction). sums_C may hold paired differences of
    two models on the same contexts."""
    C, total = len(n_C), n_C.sum()
    if C < 2:
        return math.nan
    resid_C = sums_C - sums_C.sum() / total * n_C
    return (C / (C - 1) * resid_C.pow(2).sum()).sqrt().item() / total.item()


def paired_difference(eval_a: dict, eval_b: dict, metric: str) -> tuple[float, float]:
    """Mean of `metric` (a key of eval.json's per_context, e.g. "replacement_kl") for model a minus model
    b on the same scored tokens, and its context-clustered standard error: what is hard in a context is
    hard for both, and cancels."""
    a, b = eval_a["per_context"], eval_b["per_context"]
    if a["n_scored_tokens"] != b["n_scored_tokens"] or not torch.allclose(
            torch.tensor(a["ce_clean"]), torch.tensor(b["ce_clean"]), rtol=1e-4):
        raise UsageError("the two evaluations scored different tokens: evaluate both with the same eval.n_tokens "
                         "and eval.context_size, on checkpoints of the same data")
    n_C = torch.tensor(a["n_scored_tokens"], dtype=torch.float64)
    diff_C = torch.tensor(a[metric], dtype=torch.float64) - torch.tensor(b[metric], dtype=torch.float64)
    return (diff_C.sum() / n_C.sum()).item(), clustered_stderr(diff_C, n_C)


class DownstreamStats:
    """Per-context sums of CE, KL(clean ‖ patched) and top-1 agreement per patch setting: each
    metric's mean over scored tokens, and its standard error clustered by context."""

    def __init__(self, n_contexts: int):
        self.n_C = torch.zeros(n_contexts, dtype=torch.float64)
        self.sums: dict[str, dict[str, Tensor]] = {}

    def add_clean(self, logp_clean_NV: Tensor, targets_N: Tensor, context_N: Tensor) -> None:
        self.n_C.index_add_(0, context_N.cpu(), torch.ones(len(context_N), dtype=torch.float64))
        self._add("clean", context_N, {"ce": -logp_clean_NV.gather(-1, targets_N[:, None])[:, 0]})

    def add(self, name: str, logp_clean_NV: Tensor, logp_NV: Tensor, targets_N: Tensor, context_N: Tensor) -> None:
        kl_N = (logp_clean_NV.exp() * (logp_clean_NV - logp_NV)).sum(-1)
        agree_N = logp_clean_NV.argmax(-1) == logp_NV.argmax(-1)
        self._add(name, context_N, {"ce": -logp_NV.gather(-1, targets_N[:, None])[:, 0], "kl": kl_N,
                                    "top1_agreement": agree_N})

    def _add(self, name: str, context_N: Tensor, values: dict[str, Tensor]) -> None:
        sums = self.sums.setdefault(name, {k: torch.zeros_like(self.n_C) for k in values})
        for k, v_N in values.items():
            sums[k].index_add_(0, context_N.cpu(), v_N.cpu().double())

    def mean(self, name: str, key: str) -> float:
        return (self.sums[name][key].sum() / self.n_C.sum()).item()

    def stderr(self, name: str, key: str) -> float:
        return clustered_stderr(self.sums[name][key], self.n_C)


def ce_recovered(ce_clean: float, ce_patched: float, ce_ablated: float) -> float:
    return (ce_ablated - ce_patched) / (ce_ablated - ce_clean)


@torch.no_grad()
def mean_activations(model: HookedTransformer, contexts_CT: Tensor, hooks: list[str], exclude_ids: list[int],
                     batch_contexts: int) -> dict[str, Tensor]:
    """{hook: [D]} mean activation over the scored (non-excluded) positions: the mean-ablation value."""
    from nn_decomp.data.store import hook_layer

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
    from nn_decomp.data.store import hook_layer

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
    paths = checkpoint_list(cfg)
    if len(paths) > 1 and not cfg.out:
        raise UsageError("several checkpoints: pass out=DIR for their eval.json")
    dictionaries = load_dictionaries(paths)
    model_name = check_model_choice(cfg, dictionaries)
    out_dir = Path(cfg.out) if cfg.out else paths[0]
    refuse_existing([out_dir / EVAL_JSON, out_dir / DENSITY_PNG], cfg.overwrite)
    ckpt_cfg, meta = read_config(dictionaries[0].path)
    if model is None:
        from nn_decomp.models import load_model

        model = load_model(model_name, cfg.device, cfg.dtype, first_n_layers=None, cache_dir=cfg.cache_dir)
    for d in dictionaries:
        d.coder.to(model.cfg.device)
    check_compatible(model, dictionaries)
    exclude_ids = excluded_token_ids(model.tokenizer)
    ev = cfg.eval
    context_size = ev.context_size or text_config(ckpt_cfg, meta).data.context_size
    if context_size > model.cfg.n_ctx:
        raise UsageError(f"contexts of {context_size} tokens exceed {model.cfg.model_name}'s n_ctx={model.cfg.n_ctx}: "
                         f"pass eval.context_size={model.cfg.n_ctx}")
    contexts = heldout_contexts(text_config(ckpt_cfg, meta), model.tokenizer, ev.n_tokens, context_size)
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


@hydra.main(version_base="1.3", config_path="../../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    exit_on_usage_error(evaluate, cfg)


if __name__ == "__main__":
    main()
