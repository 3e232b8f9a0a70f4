"""circuit-tracer 0.5.0's edge scores, one GEMM per position instead of a gathered gradient copy.

circuit-tracer contracts each layer's output gradient with the decoder rows written there as
    einsum(grads[:, positions_of_rows], rows, "batch position d, position d -> position batch"),
which first copies a [batch, rows, d] gather of the gradient and then does one matrix-vector
product per row. A CLT writes every active latent of a source layer into all later layers, so a
layer receives ~15x the rows a per-layer transcoder writes there: on 2 CPU cores this contraction
was ~70 % of a CLT graph's time. Grouping rows by position gives the same sums as one
[rows_at_p, d] @ [d, batch] GEMM per position. `install()` swaps it into both of circuit-tracer's
backends (nnsight, TransformerLens); the opt-in test compares graphs with and without it.
"""
import weakref

import numpy as np
import torch
from circuit_tracer.attribution import context_nnsight, context_transformerlens
from einops import einsum


def contract(grads: torch.Tensor, output_vecs: torch.Tensor, read_index) -> torch.Tensor:
    """[rows, batch]: grads[b, position of row] · output_vecs[row]. read_index is circuit-tracer's:
    `np.s_[:]` (row i is position i: error nodes) or `np.s_[:, positions]` (feature rows)."""
    grads = grads.to(output_vecs.dtype)
    if isinstance(read_index, slice):
        return einsum(grads[read_index], output_vecs, "batch position d_model, position d_model -> position batch")
    positions = torch.as_tensor(read_index[1], device=grads.device)
    out = output_vecs.new_empty(len(positions), grads.shape[0])
    for position in positions.unique().tolist():
        rows = (positions == position).nonzero().squeeze(1)
        out[rows] = output_vecs[rows] @ grads[:, position].T
    return out


def nnsight_compute_score(self, grads, output_vecs, write_index, read_index=np.s_[:]) -> None:
    self._batch_buffer[write_index] += contract(grads, output_vecs, read_index)


def transformerlens_compute_score_hook(self, hook_name, output_vecs, write_index, read_index=np.s_[:]):
    proxy = weakref.proxy(self)  # as circuit-tracer: the hook must not keep its context alive

    def _hook_fn(grads, hook) -> None:
        proxy._batch_buffer[write_index] += contract(grads, output_vecs, read_index)

    return hook_name, _hook_fn


def install() -> None:
    context_nnsight.AttributionContext.compute_score = nnsight_compute_score
    context_transformerlens.AttributionContext._compute_score_hook = transformerlens_compute_score_hook
