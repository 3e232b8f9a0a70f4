"""Checks our circuit-tracer exports inside circuit-tracer 0.5.0 itself: a bridge worker, run in
circuit-tracer's own Python by the opt-in tests in tests/test_export.py.

args: {"loaders": [{"export": DIR, "tensors": NAME}], "replacement": {"export": DIR, "hf_model": DIR,
"tensors": NAME, "prompt": STR} or null}. Each NAME is a request tensors file holding our results: for
a loader check x_LND and our features_LNF and recon_LND; for the replacement model the prompt's tokens,
our features_LPF (the dictionaries run on our TransformerLens model) and logits_PV (centred:
TransformerLens centres the unembedding, which shifts every logit of a position alike).
result: the largest absolute differences, per loader check (keyed by export) and for the replacement
model, and the attribution graph's size.
"""
from pathlib import Path

import torch
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.utils.caching import load_transcoders_from_cache
from safetensors.torch import load_file

from protocol import serve  # workers/protocol.py: this script's dir is first on sys.path

CPU = torch.device("cpu")


def load(export: str):
    out = Path(export)
    transcoders, _ = load_transcoders_from_cache(out.name, cache_dir=out.parent, device=CPU, lazy_decoder=False)
    return transcoders


def centred(logits: torch.Tensor) -> torch.Tensor:
    return logits - logits.mean(-1, keepdim=True)


def check_loader(export: str, tensors: Path) -> dict:
    transcoders, ours = load(export), load_file(tensors)
    x_LND = ours["x_LND"]
    features_LNF = transcoders.encode(x_LND)
    recon_LND = transcoders.decode(features_LNF, x_LND)
    return {"features": (features_LNF - ours["features_LNF"]).abs().max().item(),
            "recon": (recon_LND - ours["recon_LND"]).abs().max().item()}


def check_replacement(export: str, hf_model: str, tensors: Path, prompt: str) -> dict:
    model = ReplacementModel.from_pretrained_and_transcoders(hf_model, load(export), backend="nnsight", device=CPU)
    ours = load_file(tensors)
    tokens = ours["tokens"]
    logits, features_LPF = model.get_activations(tokens[None])
    # circuit-tracer zeroes position 0 (BOS) of every feature map; compare the rest.
    graph = attribute(prompt, model, max_n_logits=3, batch_size=64)
    return {"features": (features_LPF[:, 1:] - ours["features_LPF"][:, 1:]).abs().max().item(),
            "feature_scale": ours["features_LPF"].abs().max().item(),
            "logits": (centred(logits.squeeze(0)) - ours["logits_PV"]).abs().max().item(),
            "graph_nodes": int(graph.adjacency_matrix.shape[0]),
            "graph_active_features": int(graph.active_features.shape[0]),
            "graph_finite": bool(torch.isfinite(graph.adjacency_matrix).all())}


def check(args: dict, tensors: dict[str, Path]) -> dict:
    result = {"loaders": {c["export"]: check_loader(c["export"], tensors[c["tensors"]]) for c in args["loaders"]}}
    replacement = args["replacement"]
    if replacement:
        result["replacement"] = check_replacement(**replacement | {"tensors": tensors[replacement["tensors"]]})
    return result


if __name__ == "__main__":
    serve(check)
