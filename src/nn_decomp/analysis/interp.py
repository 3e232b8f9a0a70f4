"""Interpretability reports for a trained dictionary: max-activating examples per feature as a
self-contained HTML dashboard, feature density, autointerp (a judge explains a feature from its
top examples), intruder detection (can the judge pick the one non-activating example out of a
set) and faithfulness (ablating a feature changes the LM's prediction where it fires, and not
elsewhere).

A feature is (source index i into the dictionary's layers, latent f); its id is `i * F + f`.
Judges: `OfflineJudge` uses only the examples' tokens (no network: the default, and what tests
run); `OpenAIJudge` asks an OpenAI-compatible chat endpoint (URL, model, API key from an env var).
"""
import base64
import csv
import html
import json
import math
import os
import re
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from nn_decomp.core.activations import Latents
from nn_decomp.config.experiments import InterpConfig
from nn_decomp.data.heldout import excluded_token_ids, heldout_contexts, text_config
from nn_decomp.data.hooks import hook_layer
from nn_decomp.dictionaries import HookedDictionary
from nn_decomp.runtime.checkpoint import read_config


# --- scanning ------------------------------------------------------------------------------------

class Scan(NamedTuple):
    """fires: [X] tokens each feature fired on among n_tokens scored ones; top_values / top_contexts:
    [n_examples, X] max activation within a context and that context's index, best first."""

    fires: Tensor
    n_tokens: int
    top_values: Tensor
    top_contexts: Tensor


@torch.no_grad()
def feature_acts(model: HookedTransformer, d: HookedDictionary, tokens_BT: Tensor) -> Tensor:
    """[B, T, X] activation of every feature at every position (the coder in eval mode)."""
    stop = max(hook_layer(h) for h in d.hooks_in) + 1
    _, cache = model.run_with_cache(tokens_BT, names_filter=d.hooks_in, stop_at_layer=stop)
    x_BTLD = torch.stack([cache[h] for h in d.hooks_in], 2).to(d.coder.W_enc.dtype)
    B, T, L, D = x_BTLD.shape
    return d.coder.encode(x_BTLD.reshape(B * T, L, D)).dense().reshape(B, T, -1)


def scored_mask(tokens_BT: Tensor, exclude_ids: Sequence[int]) -> Tensor:
    return ~torch.isin(tokens_BT, torch.tensor(list(exclude_ids), device=tokens_BT.device, dtype=tokens_BT.dtype))


@torch.no_grad()
def scan(model: HookedTransformer, d: HookedDictionary, contexts_CT: Tensor, exclude_ids: Sequence[int],
         n_examples: int, batch_contexts: int = 8) -> Scan:
    """One pass over the contexts: firing counts and the n_examples contexts where each feature
    reaches its highest activation (BOS/EOS/pad positions left out)."""
    d.coder.eval()
    X = d.coder.n_sources * d.coder.n_latents
    fires, n_tokens = torch.zeros(X, dtype=torch.long), 0
    top_values = torch.full((n_examples, X), -math.inf)
    top_contexts = torch.full((n_examples, X), -1, dtype=torch.long)
    for start in range(0, len(contexts_CT), batch_contexts):
        tokens_BT = contexts_CT[start:start + batch_contexts].to(model.cfg.device)
        keep_BT = scored_mask(tokens_BT, exclude_ids)
        acts_BTX = feature_acts(model, d, tokens_BT) * keep_BT[..., None]
        fires += (acts_BTX > 0).sum((0, 1)).cpu()
        n_tokens += int(keep_BT.sum())
        ids_BX = torch.arange(start, start + len(tokens_BT))[:, None].expand(-1, X)
        values, order = torch.cat([top_values, acts_BTX.amax(1).cpu()]).topk(n_examples, dim=0)
        top_values, top_contexts = values, torch.cat([top_contexts, ids_BX]).gather(0, order)
    return Scan(fires, n_tokens, top_values, top_contexts)


def pick_features(s: Scan, n: int, seed: int) -> list[int]:
    """n features sampled uniformly among those that fired (a random sample, as autointerp scores
    are reported on), in id order."""
    alive = (s.fires > 0).nonzero().flatten()
    order = torch.randperm(len(alive), generator=torch.Generator().manual_seed(seed))
    return sorted(alive[order[:n]].tolist())


# --- examples ------------------------------------------------------------------------------------

@dataclass
class Example:
    """A window of tokens around one position; acts[i] is the feature's activation on tokens[i]."""

    context: int
    tokens: list[str]
    acts: list[float]

    @property
    def max_act(self) -> float:
        return max(self.acts, default=0.0)


@dataclass
class Feature:
    id: int
    layer: int
    latent: int
    density: float
    examples: list[Example]
    explanation: str = ""
    intruder_correct: bool | None = None
    kl_firing: float = math.nan
    kl_nonfiring: float = math.nan
    dlogp_next_firing: float = math.nan
    top_logit_tokens: list[str] | None = None

    def row(self) -> dict:
        return {"feature": self.id, "layer": self.layer, "latent": self.latent, "density": self.density,
                "max_act": max((e.max_act for e in self.examples), default=0.0), "explanation": self.explanation,
                "intruder_correct": self.intruder_correct, "kl_firing": self.kl_firing,
                "kl_nonfiring": self.kl_nonfiring, "dlogp_next_firing": self.dlogp_next_firing,
                "top_logit_tokens": " ".join(self.top_logit_tokens or [])}


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(t)]) for t in ids]


def window(tokens: list[str], acts_T: Tensor, center: int, width: int, context: int) -> Example:
    lo, hi = max(0, center - width), min(len(tokens), center + width + 1)
    return Example(context, tokens[lo:hi], [round(float(a), 4) for a in acts_T[lo:hi]])


@torch.no_grad()
def selected_acts(model, d: HookedDictionary, contexts_CT: Tensor, context_ids: list[int], features: list[int],
                  exclude_ids: Sequence[int], batch_contexts: int) -> dict[int, Tensor]:
    """{context id: [T, len(features)]} activations of the chosen features on the chosen contexts."""
    out = {}
    for start in range(0, len(context_ids), batch_contexts):
        ids = context_ids[start:start + batch_contexts]
        tokens_BT = contexts_CT[ids].to(model.cfg.device)
        acts = feature_acts(model, d, tokens_BT)[..., features] * scored_mask(tokens_BT, exclude_ids)[..., None]
        out |= dict(zip(ids, acts.cpu()))
    return out


def build_features(model, d: HookedDictionary, contexts_CT: Tensor, s: Scan, features: list[int],
                   cfg: InterpConfig, exclude_ids: Sequence[int]) -> tuple[list[Feature], dict[int, Tensor]]:
    """Each chosen feature with its max-activating windows; also returns the activations on those
    contexts ({context: [T, n_chosen]}) for the intruder and faithfulness steps."""
    tops = {x: [int(c) for v, c in zip(s.top_values[:, x], s.top_contexts[:, x]) if v > 0] for x in features}
    acts = selected_acts(model, d, contexts_CT, sorted({c for cs in tops.values() for c in cs}), features,
                         exclude_ids, cfg.batch_contexts)
    F = d.coder.n_latents
    out = []
    for col, x in enumerate(features):
        examples = []
        for c in tops[x]:
            a_T = acts[c][:, col]
            examples.append(window(token_strings(model.tokenizer, contexts_CT[c]), a_T, int(a_T.argmax()),
                                   cfg.window, c))
        out.append(Feature(x, d.layers[x // F], x % F, float(s.fires[x]) / max(s.n_tokens, 1), examples))
    return out, acts


# --- judges --------------------------------------------------------------------------------------

class Judge(Protocol):
    def explain(self, examples: list[Example]) -> str:
        """A short description of what the feature responds to, from its top examples."""

    def pick_intruder(self, examples: list[Example]) -> int:
        """Index of the example that does not belong (shown without activations)."""


def words(example: Example) -> set[str]:
    return {t.strip().lower() for t in example.tokens if t.strip()}


class OfflineJudge:
    """A baseline with no model: the explanation lists the tokens the feature fires on most often
    (weighted by activation); the intruder is the example sharing the fewest distinct tokens with
    the others."""

    def __init__(self, n_tokens: int = 3):
        self.n_tokens = n_tokens

    def explain(self, examples: list[Example]) -> str:
        weights: Counter = Counter()
        for e in examples:
            for t, a in zip(e.tokens, e.acts):
                if a > 0 and t.strip():
                    weights[t.strip()] += a
        top = [t for t, _ in weights.most_common(self.n_tokens)]
        return "fires on " + ", ".join(f'"{t}"' for t in top) if top else "no clear token"

    def pick_intruder(self, examples: list[Example]) -> int:
        sets = [words(e) for e in examples]
        overlap = [sum(len(s & o) for j, o in enumerate(sets) if j != i) for i, s in enumerate(sets)]
        return min(range(len(examples)), key=lambda i: overlap[i])


def render(example: Example, highlight: bool) -> str:
    """Text of an example; with highlight, activating tokens are wrapped in << >>."""
    return "".join(f"<<{t}>>" if highlight and a > 0 else t for t, a in zip(example.tokens, example.acts))


class OpenAIJudge:
    """A judge behind an OpenAI-compatible `POST {url}/chat/completions` (stdlib only)."""

    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60):
        self.url, self.model, self.api_key_env, self.timeout_s = url.rstrip("/"), model, api_key_env, timeout_s

    def ask(self, prompt: str) -> str:
        key = os.environ.get(self.api_key_env)
        if not key:
            raise RuntimeError(f"interp.judge=openai needs an API key in ${self.api_key_env} "
                               "(or set interp.judge_api_key_env to the variable that holds it)")
        body = json.dumps({"model": self.model, "temperature": 0,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        request = urllib.request.Request(f"{self.url}/chat/completions", data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.load(response)["choices"][0]["message"]["content"].strip()

    def explain(self, examples: list[Example]) -> str:
        shown = "\n".join(f"{i + 1}. {render(e, True)}" for i, e in enumerate(examples))
        return self.ask("These text excerpts are where one feature of a language model activates most; the "
                        "tokens it fires on are marked <<like this>>. In one short phrase, what does the "
                        f"feature respond to?\n\n{shown}\n\nAnswer with the phrase only.")

    def pick_intruder(self, examples: list[Example]) -> int:
        shown = "\n".join(f"{i + 1}. {render(e, False)}" for i, e in enumerate(examples))
        answer = self.ask("All but one of these text excerpts share a common feature. Which one does not "
                          f"belong?\n\n{shown}\n\nAnswer with its number only.")
        match = re.search(r"\d+", answer)
        return int(match.group()) - 1 if match else -1


def make_judge(cfg: InterpConfig) -> Judge:
    if cfg.judge == "openai":
        return OpenAIJudge(cfg.judge_url, cfg.judge_model, cfg.judge_api_key_env)
    return OfflineJudge()


def intruder_trial(feature: Feature, pool: dict[int, Tensor], col: int, tokens_of, cfg: InterpConfig,
                   generator: torch.Generator) -> tuple[list[Example], int] | None:
    """The feature's top windows plus one window from a context where it never fires, shuffled;
    returns (examples, index of the intruder), or None when no such context is in the pool."""
    silent = [c for c, acts_TX in pool.items() if not (acts_TX[:, col] > 0).any()]
    shown = feature.examples[:cfg.intruder_examples]
    if not silent or len(shown) < 2:
        return None
    c = silent[int(torch.randint(len(silent), (1,), generator=generator))]
    center = int(torch.randint(len(pool[c]), (1,), generator=generator))
    intruder = window(tokens_of(c), pool[c][:, col], center, cfg.window, c)
    examples = shown + [intruder]
    order = torch.randperm(len(examples), generator=generator).tolist()
    return [examples[i] for i in order], order.index(len(examples) - 1)


# --- faithfulness --------------------------------------------------------------------------------

def _subtract_write(act_BTD: Tensor, hook, *, a_BT: Tensor, w_D: Tensor) -> Tensor:
    return act_BTD - a_BT[..., None].to(act_BTD) * w_D.to(act_BTD)


@torch.no_grad()
def ablation_kl(model: HookedTransformer, d: HookedDictionary, tokens_BT: Tensor, a_BT: Tensor, i: int,
                latent: int) -> tuple[Tensor, Tensor]:
    """Ablate one feature: subtract its decoder write a·W_dec from every output hook it writes to
    (all j ≥ i for a CLT) in an otherwise clean forward pass. Returns, per position t < T−1,
    KL(clean ‖ ablated) of the next-token distribution and the change in log p(actual next token)."""
    coder = d.coder
    targets = range(i, coder.n_layers) if coder.cross_layer or coder.crosscoder else [i]
    # what the decoder multiplies: the activation after the latent's feature offset / scale, if any
    one_latent = Latents(a_BT.reshape(-1, 1, 1), torch.full((a_BT.numel(), 1, 1), latent), coder.n_latents)
    a_BT = coder.feature_values(one_latent, slice(i, i + 1)).values.view_as(a_BT)
    decoder = coder.decoder(i)
    hooks = [(d.hooks_out[j], partial(_subtract_write, a_BT=a_BT, w_D=decoder[latent, j - i])) for j in targets]
    logp_clean = model(tokens_BT).log_softmax(-1)[:, :-1]
    with model.hooks(fwd_hooks=hooks):
        logp_ablated = model(tokens_BT).log_softmax(-1)[:, :-1]
    kl_BT = (logp_clean.exp() * (logp_clean - logp_ablated)).sum(-1)
    next_BT1 = tokens_BT[:, 1:, None]
    return kl_BT, (logp_ablated.gather(-1, next_BT1) - logp_clean.gather(-1, next_BT1))[..., 0]


def ablation_effect(model: HookedTransformer, d: HookedDictionary, tokens_BT: Tensor, a_BT: Tensor, i: int,
                    latent: int, keep_BT: Tensor) -> tuple[float, float, float]:
    """Mean KL at the scored positions where the feature fires, where it does not (same contexts:
    only attention to earlier firing positions can move those), and mean Δlog p(next) where it fires."""
    kl_BT, dlogp_BT = ablation_kl(model, d, tokens_BT, a_BT, i, latent)
    fires_BT, scored_BT = a_BT[:, :-1] > 0, keep_BT[:, :-1]
    mean = lambda t, m: float(t[m].mean()) if m.any() else math.nan  # noqa: E731
    return (mean(kl_BT, fires_BT & scored_BT), mean(kl_BT, ~fires_BT & scored_BT),
            mean(dlogp_BT, fires_BT & scored_BT))


def top_logit_tokens(model: HookedTransformer, d: HookedDictionary, i: int, latent: int, n: int = 5) -> list[str]:
    """Tokens whose logits the feature's (last) decoder vector raises most through the unembedding
    alone (direct path; later layers and the final norm ignored)."""
    w_D = d.coder.decoder(i)[latent, -1].to(model.W_U)
    return token_strings(model.tokenizer, (w_D @ model.W_U).topk(n).indices.tolist())


# --- the report ----------------------------------------------------------------------------------

class Report(NamedTuple):
    """features: the analysed features; density: [X] firing fraction of every feature;
    summary: the headline numbers (JSON-ready)."""

    features: list[Feature]
    density: Tensor
    summary: dict


def analyse(model: HookedTransformer, d: HookedDictionary, contexts_CT: Tensor, exclude_ids: Sequence[int],
            cfg: InterpConfig, judge: Judge | None = None, faithfulness: bool = True) -> Report:
    """Scan, pick features, explain them, run intruder trials and ablations."""
    judge = judge or make_judge(cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    s = scan(model, d, contexts_CT, exclude_ids, cfg.n_examples, cfg.batch_contexts)
    chosen = pick_features(s, cfg.n_features, cfg.seed)
    features, acts = build_features(model, d, contexts_CT, s, chosen, cfg, exclude_ids)
    pool_ids = torch.randperm(len(contexts_CT), generator=generator)[:max(8, cfg.intruder_examples * 4)].tolist()
    pool = selected_acts(model, d, contexts_CT, pool_ids, chosen, exclude_ids, cfg.batch_contexts)
    tokens_of = lambda c: token_strings(model.tokenizer, contexts_CT[c])  # noqa: E731
    F = d.coder.n_latents
    # a MOLT latent's write depends on the input (its transform): no fixed vector to read or subtract
    fixed_writes = d.coder.transforms is None
    for col, f in enumerate(features):
        f.explanation = judge.explain(f.examples)
        trial = intruder_trial(f, pool, col, tokens_of, cfg, generator)
        if trial is not None:
            f.intruder_correct = judge.pick_intruder(trial[0]) == trial[1]
        if not fixed_writes:
            continue
        f.top_logit_tokens = top_logit_tokens(model, d, f.id // F, f.latent)
        ctx = [e.context for e in f.examples[:cfg.faithfulness_contexts]]
        if faithfulness and ctx:
            tokens_BT = contexts_CT[ctx].to(model.cfg.device)
            a_BT = torch.stack([acts[c][:, col] for c in ctx]).to(model.cfg.device)
            f.kl_firing, f.kl_nonfiring, f.dlogp_next_firing = ablation_effect(
                model, d, tokens_BT, a_BT, f.id // F, f.latent, scored_mask(tokens_BT, exclude_ids))
    return Report(features, s.fires.double() / max(s.n_tokens, 1), summarise(features, s, cfg.intruder_examples))


def _median(values: list[float]) -> float:
    values = sorted(v for v in values if v == v)
    return values[len(values) // 2] if values else math.nan


def summarise(features: list[Feature], s: Scan, intruder_examples: int) -> dict:
    trials = [f.intruder_correct for f in features if f.intruder_correct is not None]
    return {"n_tokens": s.n_tokens, "n_features_total": len(s.fires),
            "alive_fraction": float((s.fires > 0).double().mean()), "n_features_analysed": len(features),
            "intruder_trials": len(trials), "intruder_accuracy": sum(trials) / len(trials) if trials else math.nan,
            "intruder_chance": 1 / (1 + intruder_examples),
            "median_kl_firing": _median([f.kl_firing for f in features]),
            "median_kl_nonfiring": _median([f.kl_nonfiring for f in features]),
            "median_dlogp_next_firing": _median([f.dlogp_next_firing for f in features])}


# --- outputs -------------------------------------------------------------------------------------

def density_histogram(density: Tensor, path: Path) -> Path:
    """Histogram of log10(firing fraction) of every feature; dead ones counted in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alive = density[density > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(alive):
        ax.hist(alive.log10().numpy(), bins=40)
    ax.set(xlabel="log10(feature density)", ylabel="features",
           title=f"{int((density == 0).sum())} of {len(density)} features never fired")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tokens_html(example: Example, scale: float) -> str:
    spans = []
    for t, a in zip(example.tokens, example.acts):
        alpha = min(a / scale, 1.0) if scale > 0 and a > 0 else 0.0
        text = html.escape(t).replace("\n", "↵")
        spans.append(f'<span class="tok" style="background:rgba(255,120,0,{alpha:.2f})" '
                     f'title="{a:.3g}">{text}</span>')
    return "".join(spans)


def _feature_html(f: Feature) -> str:
    scale = max((e.max_act for e in f.examples), default=0.0)
    intruder = {True: "picked", False: "missed", None: "n/a"}[f.intruder_correct]
    rows = "".join(f'<li><span class="act">{e.max_act:.3g}</span> {_tokens_html(e, scale)}</li>' for e in f.examples)
    logits = html.escape(" ".join(repr(t) for t in f.top_logit_tokens or []))
    return (f'<section class="feature" id="feature-{f.id}" data-feature="{f.id}">'
            f"<h2>feature {f.id} <small>(layer {f.layer}, latent {f.latent})</small></h2>"
            f'<p class="explanation">{html.escape(f.explanation)}</p>'
            f"<p class=\"stats\">density {f.density:.3g} · max act {scale:.3g} · intruder {intruder} · "
            f"ablation KL firing {f.kl_firing:.3g} / not firing {f.kl_nonfiring:.3g} · "
            f"Δlog p(next) firing {f.dlogp_next_firing:.3g}</p>"
            f'<p class="logits">direct logit boost: {logits}</p><ol class="examples">{rows}</ol></section>')


CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{font-size:1.3em;word-break:break-all}
.feature{border-top:1px solid #ccc;padding:.5em 0}.tok{white-space:pre-wrap;font-family:monospace;border-radius:2px}
.act{display:inline-block;width:4em;color:#888;font-size:.8em}.explanation{font-style:italic}
.stats,.logits{font-size:.85em;color:#555}ol.examples{line-height:1.6}"""


def dashboard_html(report: Report, title: str, histogram_png: Path | None = None) -> str:
    """One self-contained HTML page (inline CSS, histogram embedded as base64, no scripts)."""
    summary = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" if isinstance(v, float) else
                      f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in report.summary.items())
    image = ""
    if histogram_png is not None and histogram_png.exists():
        data = base64.b64encode(histogram_png.read_bytes()).decode()
        image = f'<img alt="feature density histogram" src="data:image/png;base64,{data}">'
    features = "".join(_feature_html(f) for f in report.features)
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<table class="summary">{summary}</table>{image}<div id="features">{features}</div></body></html>')


def write_report(report: Report, out_dir: Path, title: str) -> list[Path]:
    """dashboard.html, density.png, features.csv and summary.json in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hist = density_histogram(report.density, out_dir / "density.png")
    page = out_dir / "dashboard.html"
    page.write_text(dashboard_html(report, title, hist), encoding="utf-8")
    table = out_dir / "features.csv"
    rows = [f.row() for f in report.features]
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["feature"])
        writer.writeheader()
        writer.writerows(rows)
    summary = out_dir / "summary.json"
    summary.write_text(json.dumps(report.summary, indent=2))
    return [page, hist, table, summary]


def load_report_inputs(checkpoint: Path, model: HookedTransformer, n_tokens: int):
    """The dictionary and held-out contexts of its run, plus excluded ids."""
    d = HookedDictionary.load(checkpoint, model.cfg.device)
    ckpt_cfg, meta = read_config(checkpoint)
    contexts = heldout_contexts(text_config(ckpt_cfg, meta), model.tokenizer, n_tokens)
    return d, contexts, excluded_token_ids(model.tokenizer)
