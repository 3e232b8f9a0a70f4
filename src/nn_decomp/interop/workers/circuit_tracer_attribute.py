"""Attribution graphs of prompts through our exported dictionaries, in circuit-tracer 0.5.0 itself:
the bridge worker behind `python -m nn_decomp.attribute` (nn_decomp/interop/attribution.py).

args: {"export": DIR (circuit_tracer_files), "model": a Hub name or a local Hugging Face folder,
"backend": "nnsight" | "transformerlens", "scan": STR, "reuse_graphs": BOOL (a prompt's saved graph and result: rescore it), "device": "auto" | "cpu" | "cuda…", "settings": {batch_size, max_feature_nodes,
max_n_logits, desired_logit_prob, node_threshold, edge_threshold, completeness},
"prompts": [{"slug", "text", "graph": PATH.pt, "files": DIR, "result": PATH.json}]}.
Per prompt it writes the graph (.pt), circuit-tracer's frontend JSON (files/<slug>.json) and a result
JSON, as it goes (a later call skips nothing itself: the caller passes only the prompts left, or
those whose result lacks a score added since, to rescore from the saved graph).
result: {"results": [the result of each prompt]}.
Edge scores go through grouped_scores (the same sums, ~10x faster for a CLT on CPU).
"""
import json
import time
from pathlib import Path

import torch
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.graph import Graph, compute_graph_scores, prune_graph
from circuit_tracer.utils.caching import load_transcoders_from_cache
from circuit_tracer.utils.create_graph_files import create_graph_files

import grouped_scores  # siblings: this script's dir is first on sys.path
from graph_scores import ADDED, Layout, pruned_scores
from protocol import serve

THRESHOLD_STEPS = 12  # bisection steps for the node threshold that reaches a completeness


def load_model(args: dict):
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args["device"] == "auto" else args["device"])
    export = Path(args["export"])
    transcoders, _ = load_transcoders_from_cache(export.name, cache_dir=export.parent, device=device,
                                                 lazy_decoder=False)
    return ReplacementModel.from_pretrained_and_transcoders(args["model"], transcoders, backend=args["backend"],
                                                            device=device, dtype=torch.float32)


def layout(graph) -> Layout:
    n_pos = len(graph.input_tokens)
    return Layout(len(graph.selected_features), graph.cfg.n_layers * n_pos, n_pos, len(graph.logit_targets))


def pruned(graph, node_threshold: float, edge_threshold: float) -> dict:
    """The graph kept at these thresholds: its size and its scores with the pruned part as error."""
    node_mask, edge_mask, _ = prune_graph(graph, node_threshold, edge_threshold)
    shape = layout(graph)
    replacement, completeness = pruned_scores(graph.adjacency_matrix, graph.logit_probabilities, shape,
                                              node_mask, edge_mask)
    features = int(node_mask[:shape.n_features].sum())
    errors = int(node_mask[shape.errors].sum())
    return {"node_threshold": node_threshold, "edge_threshold": edge_threshold, "nodes": int(node_mask.sum()),
            "feature_nodes": features, "error_nodes": errors, "edges": int(edge_mask.sum()),
            "error_node_share": errors / max(features + errors, 1),
            "replacement": replacement, "completeness": completeness}


def at_completeness(graph, target: float, edge_threshold: float) -> dict | None:
    """The smallest graph (bisecting the node threshold) whose pruned completeness reaches `target`;
    None when even the whole graph falls short."""
    whole = pruned(graph, 1.0, 1.0)
    if whole["completeness"] < target:
        return None
    lo, hi, best = 0.0, 1.0, whole
    for _ in range(THRESHOLD_STEPS):
        mid = (lo + hi) / 2
        candidate = pruned(graph, mid, edge_threshold)
        if candidate["completeness"] >= target:
            hi, best = mid, candidate
        else:
            lo = mid
    return best


def added(graph, old: dict) -> dict:
    """The scores of graph_scores.ADDED that `old` lacks."""
    return {name: score(graph.adjacency_matrix, layout(graph)) for name, score in ADDED.items() if name not in old}


def attribute_prompt(model, prompt: dict, scan: str, s: dict) -> dict:
    start = time.time()
    graph = attribute(prompt["text"], model, max_n_logits=s["max_n_logits"], desired_logit_prob=s["desired_logit_prob"],
                      batch_size=s["batch_size"], max_feature_nodes=s["max_feature_nodes"])
    seconds = time.time() - start
    graph.to_pt(prompt["graph"])
    create_graph_files(graph, prompt["slug"], prompt["files"], scan=scan, node_threshold=s["node_threshold"],
                       edge_threshold=s["edge_threshold"])
    replacement, completeness = compute_graph_scores(graph)
    ours = pruned_scores(graph.adjacency_matrix, graph.logit_probabilities, layout(graph))
    tokenizer = model.tokenizer
    return {"slug": prompt["slug"], "prompt": prompt["text"], "n_tokens": len(graph.input_tokens),
            "tokens": [tokenizer.decode([t]) for t in graph.input_tokens.tolist()],
            "active_features": int(graph.active_features.shape[0]),
            "feature_nodes": int(len(graph.selected_features)), "seconds": seconds,
            "replacement": replacement, "completeness": completeness,
            "rescored": {"replacement": ours[0], "completeness": ours[1]},
            "pruned": pruned(graph, s["node_threshold"], s["edge_threshold"]),
            "at_completeness": at_completeness(graph, s["completeness"], s["edge_threshold"]),
            "completeness_target": s["completeness"],
            "top_logits": [{"token": t.token_str, "id": int(t.vocab_idx), "prob": float(p)}
                           for t, p in zip(graph.logit_targets, graph.logit_probabilities)]
            } | added(graph, {})


def result_of(model, prompt: dict, scan: str, s: dict, reuse: bool) -> dict:
    """A saved graph with its result gets the scores its result lacks; anything else is attributed."""
    result = Path(prompt["result"])
    if reuse and Path(prompt["graph"]).exists() and result.exists():
        old = json.loads(result.read_text())
        graph = Graph.from_pt(prompt["graph"])
        return old | added(graph, old)
    return attribute_prompt(model, prompt, scan, s)


def run(args: dict, tensors: dict[str, Path]) -> dict:
    grouped_scores.install()
    model = load_model(args)
    results = []
    for prompt in args["prompts"]:
        result = result_of(model, prompt, args["scan"], args["settings"], args["reuse_graphs"])
        Path(prompt["result"]).write_text(json.dumps(result, indent=1))
        print(f"{prompt['slug']}: replacement {result['replacement']:.3f} completeness {result['completeness']:.3f} "
              f"({result['feature_nodes']} feature nodes, {result['seconds']:.0f} s)", flush=True)
        results.append(result)
    return {"results": results}


if __name__ == "__main__":
    serve(run)
