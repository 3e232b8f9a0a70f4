"""Evaluation metrics as running sums: reconstruction per layer (`ReconstructionStats`), downstream
CE / KL / top-1 agreement per context (`DownstreamStats`), their standard errors clustered by
context, and paired differences of two models scored on the same tokens. Definitions (the strings
below) go into every eval.json beside the numbers.
"""
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from nn_decomp.config import UsageError
from nn_decomp.core.activations import Latents

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


def mean_stderr(values: Sequence[float]) -> dict:
    """Mean and standard error over independent samples (e.g. prompts), NaNs (no value) left out."""
    x = torch.tensor(values, dtype=torch.float64)
    x = x[~x.isnan()]
    n = len(x)
    stderr = (x.std() / math.sqrt(n)).item() if n > 1 else float("nan")
    return {"mean": x.mean().item() if n else float("nan"), "stderr": stderr, "n": n}


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
