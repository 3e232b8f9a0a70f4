"""Attribution graphs through a full-depth dictionary set, scored in the lab: what
`python -m nn_decomp.attribute` runs. The engine is circuit-tracer 0.5.0 in its own Python (bridge.py);
the lab checks the input, exports the set (circuit_tracer.py), drives the worker
(workers/circuit_tracer_attribute.py), scores the replacement model on each prompt itself and
writes one summary.

`out/` holds: `export/` (the set in circuit-tracer's format), per prompt `graphs/<slug>.pt`
(circuit-tracer's Graph), `graph_files/<slug>.json` (its frontend JSON), `pages/<slug>.html` (our
offline page, analysis/graph_page.py) and `prompts/<slug>.json` (every score), then `summary.json`
and `summary.csv`. A rerun attributes only the prompts without a `prompts/<slug>.json`: a run cut
short keeps every graph it finished, and the summary covers the prompts attributed so far.

Scores per prompt (the worker's): circuit-tracer's replacement and completeness of the unpruned
graph; the graph pruned at node_threshold / edge_threshold (circuit-tracer's defaults 0.8 / 0.98):
nodes, edges, error-node share and its own scores with everything pruned counted as error
(workers/graph_scores.py); the smallest pruned graph reaching `completeness`; the top logits.
And ours: the replacement model (every MLP replaced, no error terms) against the clean model on the
prompt's tokens — KL(clean ‖ replaced) and CE per position. With error terms the replacement model
is the clean model by construction (circuit-tracer's attribution checks that), so it has no score.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.nn import functional as F

from nn_decomp.analysis.graph_page import write_graph_page
from nn_decomp.analysis.metrics import mean_stderr
from nn_decomp.analysis.patching import replacement_model
from nn_decomp.config import UsageError, check_command
from nn_decomp.dictionaries import HookedDictionary, checkpoint_list, load_dictionaries
from nn_decomp.interop.bridge import WORKERS, require_python, run_worker
from nn_decomp.interop.circuit_tracer import CIRCUIT_TRACER, circuit_tracer_files, hf_model_config
from nn_decomp.interop.formats import write_dir
from nn_decomp.interop.workers.graph_scores import ADDED
from nn_decomp.runtime.checkpoint import read_config
from nn_decomp.runtime.files import write_atomic

WORKER = WORKERS / "circuit_tracer_attribute.py"
SETTINGS = ("batch_size", "max_feature_nodes", "max_n_logits", "desired_logit_prob", "node_threshold",
            "edge_threshold", "completeness")
SUMMARY_COLUMNS = ["replacement", "completeness", "pruned.nodes", "pruned.edges", "pruned.error_node_share",
                   "pruned.replacement", "pruned.completeness", "at_completeness.nodes", "at_completeness.edges",
                   "cancellation.features", "cancellation.logits", "replacement_kl", "replacement_ce", "clean_ce",
                   "feature_nodes", "seconds"]


def scored(result: Path) -> bool:
    """A prompt's result holds every score the worker writes today (one written before a score was
    added, graph_scores.ADDED, gets it from its saved graph, without attributing again)."""
    return result.exists() and ADDED.keys() <= json.loads(result.read_text()).keys()


def read_prompts(path: str | None) -> list[str]:
    """One prompt per line of the file (blank lines and lines starting with # skipped)."""
    if not path:
        raise UsageError("pass prompts=FILE: a text file with one prompt per line")
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"prompts={path} does not exist: pass a text file with one prompt per line")
    prompts = [line.strip() for line in file.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UsageError(f"prompts={path} holds no prompt: write one per line (# starts a comment)")
    return prompts


def slug(i: int, prompt: str) -> str:
    return f"{i:03d}_" + re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:40]


def check_full_depth(dictionaries: list[HookedDictionary], n_layers: int) -> None:
    layers = sorted(layer for d in dictionaries for layer in d.layers)
    if layers != list(range(n_layers)):
        missing = sorted(set(range(n_layers)) - set(layers))
        raise UsageError(f"attribution replaces every MLP of the model ({n_layers} layers), but these checkpoints "
                         f"cover {len(layers)} layers (missing {missing[:10]}{'…' if len(missing) > 10 else ''}): "
                         "pass a CLT over all layers, or checkpoints=[...] with one transcoder per layer")


def model_folder(cfg: DictConfig, model_name: str) -> tuple[str, str]:
    """(what circuit-tracer loads, its backend): `hf_model`, else SmolLM2 from a Hugging Face folder
    the lab writes once (nnsight: circuit-tracer's TransformerLens backend lacks it), else the Hub name."""
    from nn_decomp.models import SMOLLM2, hub_name  # transformers: after the input checks

    if cfg.hf_model:
        return cfg.hf_model, "nnsight"
    if model_name != SMOLLM2:
        return hub_name(model_name), "transformerlens"
    folder = Path(cfg.paths.cache_dir).expanduser() / "hf_models" / model_name
    if not (folder / "config.json").is_file():
        from nn_decomp.interop.formats import write_hf_dir

        print(f"writing {model_name} as a Hugging Face folder for circuit-tracer: {folder}")
        write_hf_dir(folder, None)
    return str(folder), "nnsight"


def model_depth(cfg: DictConfig, model_name: str) -> int:
    """Blocks of the model circuit-tracer will run: hf_model's config, else the model's own."""
    from nn_decomp.models import model_n_layers  # transformers config only

    if not cfg.hf_model:
        return model_n_layers(model_name, cfg.paths.cache_dir)
    return hf_model_config(Path(cfg.hf_model))["num_hidden_layers"]


@torch.no_grad()
def replacement_scores(model, dictionaries: list[HookedDictionary], prompt: str) -> dict:
    """KL(clean ‖ replaced) and next-token CE, mean over the prompt's positions after BOS."""
    tokens = model.to_tokens(prompt)
    clean = model(tokens)[0, 1:]
    with replacement_model(model, dictionaries) as replaced_model:
        replaced = replaced_model(tokens)[0, 1:]
    targets = tokens[0, 2:]
    log_clean, log_replaced = clean.log_softmax(-1), replaced.log_softmax(-1)
    kl = (log_clean.exp() * (log_clean - log_replaced)).sum(-1).mean()
    ce = lambda logits: F.cross_entropy(logits[:-1], targets).item() if len(targets) else float("nan")  # noqa: E731
    return {"replacement_kl": kl.item(), "replacement_ce": ce(replaced), "clean_ce": ce(clean),
            "replacement_top1_agreement": (clean.argmax(-1) == replaced.argmax(-1)).float().mean().item()}


def attribute(cfg: DictConfig) -> dict:
    """Attribute every prompt of cfg.prompts not yet done in cfg.out; returns the summary."""
    check_command(cfg)
    if not cfg.out:
        raise UsageError("pass out=DIR for the graphs and scores")
    prompts = read_prompts(cfg.prompts)
    require_python(CIRCUIT_TRACER)
    dictionaries = load_dictionaries(checkpoint_list(cfg))
    metas = [read_config(d.path)[1] for d in dictionaries]
    model_name = dictionaries[0].model_name
    n_layers = model_depth(cfg, model_name)
    check_full_depth(dictionaries, n_layers)
    out = Path(cfg.out)
    hf_model, backend = model_folder(cfg, model_name)
    scan = cfg.scan or out.name
    with torch.no_grad():  # refuses what circuit-tracer cannot run, before any model is loaded
        files = circuit_tracer_files(dictionaries, metas, hf_model if backend == "nnsight" else None, None, scan)
    export = out / "export"
    write_dir(export, files, overwrite=True)
    todo = [(slug(i, p), p) for i, p in enumerate(prompts) if cfg.overwrite or not scored(out / "prompts" / f"{slug(i, p)}.json")]
    for sub in ("graphs", "graph_files", "pages", "prompts"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if todo:
        print(f"attributing {len(todo)} of {len(prompts)} prompts with circuit-tracer ({backend} backend)", flush=True)
        run_worker(CIRCUIT_TRACER, WORKER, {
            "export": str(export), "model": hf_model, "backend": backend, "scan": scan, "device": cfg.device,
            "reuse_graphs": not cfg.overwrite,
            "settings": {key: cfg[key] for key in SETTINGS},
            "prompts": [{"slug": s, "text": p, "graph": str(out / "graphs" / f"{s}.pt"), "files": str(out / "graph_files"),
                         "result": str(out / "prompts" / f"{s}.json")} for s, p in todo]})
    # ours for every graph without them (also those of a worker run that was cut short)
    done = [(s, p) for s, p in ((slug(i, p), p) for i, p in enumerate(prompts)) if (out / "prompts" / f"{s}.json").exists()]
    unscored = [(s, p) for s, p in done if "replacement_kl" not in json.loads((out / "prompts" / f"{s}.json").read_text())]
    if unscored:
        add_replacement_scores(cfg, out, dictionaries, model_name, n_layers, unscored)
    return write_summary(cfg, out, [s for s, _ in done], metas, len(prompts))


def add_replacement_scores(cfg: DictConfig, out: Path, dictionaries: list[HookedDictionary], model_name: str,
                           n_layers: int, done: list[tuple[str, str]]) -> None:
    """Our scores of the replacement model and the graph page, added to each new prompt's result."""
    from nn_decomp.models import load_model, model_n_layers  # transformer_lens: after the worker ran

    first_n_layers = n_layers if n_layers < model_n_layers(model_name, cfg.paths.cache_dir) else None
    model = load_model(model_name, cfg.device, "float32", first_n_layers, cfg.paths.cache_dir)
    for d in dictionaries:
        d.coder.to(model.cfg.device)
    for s, prompt in done:
        path = out / "prompts" / f"{s}.json"
        result = json.loads(path.read_text()) | replacement_scores(model, dictionaries, prompt)
        write_graph_page(out / "graph_files" / f"{s}.json", out / "pages" / f"{s}.html", cfg.dashboard,
                         clt_latents=dictionaries[0].coder.n_latents if dictionaries[0].coder.cross_layer else None)
        write_atomic(path, json.dumps(result, indent=1))


def column(result: dict, key: str) -> float:
    value = result
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float("nan") if value is None else float(value)


def write_summary(cfg: DictConfig, out: Path, slugs: list[str], metas: list[dict], n_given: int) -> dict:
    """summary.json (mean ± SE over the prompts attributed, of every column; the settings, the set) and
    summary.csv (one row per prompt)."""
    results = [json.loads((out / "prompts" / f"{s}.json").read_text()) for s in slugs]
    rows = [{"slug": r["slug"], "prompt": r["prompt"], **{key: column(r, key) for key in SUMMARY_COLUMNS}}
            for r in results]
    summary = {"n_prompts": len(rows), "n_prompts_given": n_given, "checkpoints": [str(p) for p in checkpoint_list(cfg)],
               "arch": metas[0]["arch"], "act": metas[0]["act"], "settings": {key: cfg[key] for key in SETTINGS},
               "completeness_reached": sum(r["at_completeness"] is not None for r in results),
               "scores": {key: mean_stderr([row[key] for row in rows]) for key in SUMMARY_COLUMNS}}
    write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return summary
