"""Scores of a circuit-tracer attribution graph, pruned or not (torch only: the attribute worker
imports it as a sibling; `attribute` and our tests as nn_decomp.interop.workers.graph_scores).

A graph's adjacency [N, N] (rows: targets, columns: sources) orders its nodes as features, error
nodes (n_layers × n_pos), tokens, logits. circuit-tracer's `compute_graph_scores` scores the whole
graph: with A the row-normalised |adjacency| and out = influence on the logits + the logits'
own weights,
  replacement  = token influence / (token + error influence),
  completeness = Σ_nodes out · (1 − A[node, errors].sum()) / Σ_nodes out.
It cannot score a pruned graph. `pruned_scores` does, as the Circuit Tracing paper does: whatever a
kept node receives from a pruned node or through a pruned edge counts as error, the influence
propagates through kept edges only, and the error mass of a node plays the part of an error node
feeding it (error nodes themselves have no inputs, so their own fraction is 1). With nothing pruned
it equals compute_graph_scores (tests/test_attribute.py; the opt-in test checks it against
circuit-tracer itself).
"""
from typing import NamedTuple

import torch
from torch import Tensor


class Layout(NamedTuple):
    n_features: int
    n_errors: int
    n_tokens: int
    n_logits: int

    @property
    def errors(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_errors)

    @property
    def tokens(self) -> slice:
        return slice(self.errors.stop, self.errors.stop + self.n_tokens)

    @property
    def inputs(self) -> slice:
        """Nodes that feed others and are no error: features and tokens are both in [0, tokens.stop)."""
        return slice(0, self.tokens.stop)


def normalized(adjacency: Tensor) -> Tensor:
    """|adjacency| with each target's inputs summing to 1 (circuit-tracer's normalize_matrix)."""
    a = adjacency.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(a: Tensor, logit_weights: Tensor, max_iter: int = 1000) -> Tensor:
    """logit_weights @ (A + A² + ...): each node's total influence on the weighted logits (the graph
    is acyclic, so the series ends)."""
    current = logit_weights @ a
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ a
        total += current
    raise RuntimeError(f"influence did not converge in {max_iter} steps: the graph has a cycle")


def pruned_scores(adjacency: Tensor, logit_probs: Tensor, layout: Layout, node_mask: Tensor | None = None,
                  edge_mask: Tensor | None = None) -> tuple[float, float]:
    """(replacement, completeness) of the graph kept by node_mask / edge_mask (None: everything),
    with what was pruned counted as error."""
    a = normalized(adjacency)
    kept = a.clone()
    if node_mask is not None:
        kept = kept * node_mask[:, None] * node_mask[None, :]
    if edge_mask is not None:
        kept = kept * edge_mask
    kept[:, layout.errors] = 0
    logit_weights = torch.zeros(len(a), dtype=a.dtype, device=a.device)
    logit_weights[-layout.n_logits:] = logit_probs.to(a.dtype)
    out = influence(kept, logit_weights) + logit_weights
    error_mass = a.sum(1) - kept[:, layout.inputs].sum(1)  # 0 for nodes without inputs
    error_influence = (out * error_mass).sum()
    token_influence = out @ kept[:, layout.tokens].sum(1)
    replacement = token_influence / (token_influence + error_influence)
    explained = (out * (1 - error_mass)).sum() + error_influence  # error nodes explain themselves
    completeness = explained / (out.sum() + error_influence)
    return replacement.item(), completeness.item()


def cancellation(adjacency: Tensor, layout: Layout) -> dict[str, float]:
    """Σ|edges into a node| / |Σ edges into it|, pooled over the feature nodes and over the logit
    nodes: 1 when a node's inputs agree in sign, large when big inputs cancel. Both scores above
    weigh edges by their absolute value, so cancelling inputs count as explanation in full."""
    def ratio(rows: Tensor) -> float:
        return (rows.abs().sum() / rows.sum(1).abs().sum().clamp(min=1e-10)).item()

    return {"features": ratio(adjacency[:layout.n_features]), "logits": ratio(adjacency[-layout.n_logits:])}


# scores added after results were first written: a saved graph whose result lacks one gets it (and
# keeps the rest) without being attributed again (the worker computes them, `attribute` checks them)
ADDED = {"cancellation": cancellation}
