"""Training objective and reconstruction metrics, shared by every architecture and activation."""
from typing import NamedTuple

import torch
from torch import Tensor

from nn_decomp.core.activations import Latents
from nn_decomp.core.coder import CoderOutput, SparseCoder
from nn_decomp.core.kernels import aux_topk_latents


class LossOutput(NamedTuple):
    """loss: the scalar optimised. recon: Σ_d (y−ŷ)² per token, averaged over tokens and target
    layers (and over the Matryoshka prefixes). sparsity: the activation's penalty. aux: AuxK dead-latent loss (unweighted).
    fvu_L: per target layer, l0_L: per source (a crosscoder has one), detached."""

    loss: Tensor
    recon: Tensor
    sparsity: Tensor
    aux: Tensor
    fvu_L: Tensor
    l0_L: Tensor


def squared_error(recon_BLD: Tensor, y_BLD: Tensor) -> Tensor:
    return (y_BLD - recon_BLD).pow(2).sum(-1).mean()


def fvu(recon_BLD: Tensor, y_BLD: Tensor) -> Tensor:
    """[L] fraction of variance unexplained = NMSE, centred: Σ(y−ŷ)² / Σ(y−ȳ)² over batch and dims."""
    residual = (y_BLD - recon_BLD).pow(2).sum((0, 2))
    total = (y_BLD - y_BLD.mean(0)).pow(2).sum((0, 2))
    return residual / total


def explained_variance(recon_BLD: Tensor, y_BLD: Tensor) -> Tensor:
    """[L] 1 − Var(y−ŷ)/Var(y): unlike 1−FVU, a constant offset in ŷ is not counted as error."""
    return 1 - (y_BLD - recon_BLD).var(0).sum(-1) / y_BLD.var(0).sum(-1)


def aux_k_loss(coder: SparseCoder, pre_BLF: Tensor, residual_BLD: Tensor, dead_LF: Tensor,
               k_aux: int, x_BLD: Tensor | None = None) -> Tensor:
    """AuxK (Gao et al. 2024, App. B.1): the top k_aux dead latents reconstruct the residual
    error of the live ones, which gives dead latents a gradient. Same scale as the
    reconstruction loss, scaled down when fewer than k_aux latents are dead (as in sparsify).
    `x_BLD` is the encoder's input (CoderOutput.x): with detached pre-activations (the coder's
    sparse backward) the gradient reaches the encoder through the selected dead latents only, and a
    MOLT's dead transforms apply to it."""
    n_dead_L = coder.shard.total(dead_LF.sum(-1))  # tensor parallel: dead latents of every shard
    n_dead = int(n_dead_L.sum())
    if n_dead == 0:
        return pre_BLF.new_zeros(())
    k = min(k_aux, int(n_dead_L.max()))
    if pre_BLF.requires_grad or x_BLD is None:  # dense reference: autograd through pre_BLF
        values, indices = torch.where(dead_LF, pre_BLF, -torch.inf).topk(min(k, pre_BLF.shape[-1]), dim=-1,
                                                                         sorted=False)
        aux_latents = Latents(coder.shard.top_per_row(torch.relu(values), k), indices, pre_BLF.shape[-1])
    else:
        aux_latents = aux_topk_latents(pre_BLF, dead_LF, k, x_BLD, coder.W_enc, coder.b_enc, coder.shard)
    residual_hat = coder.decode(aux_latents, x_BLD, bias=False)
    scale = min(n_dead / (k_aux * coder.n_sources), 1.0)
    return scale * squared_error(residual_hat, residual_BLD.detach())


def coder_loss(coder: SparseCoder, out: CoderOutput, y_BLD: Tensor, dead_LF: Tensor | None,
               sparsity_weight: float = 1.0, progress: float = 1.0) -> LossOutput:
    """sparsity_weight: the penalty's warm-up factor (train.sparsity_warmup_steps); `sparsity` is reported
    unweighted. progress: the fraction of training done (ReLU's p-annealing)."""
    act = coder.activation
    # Matryoshka: the mean over the nested prefixes and the whole dictionary (one term unless set).
    recon = torch.stack([squared_error(r, y_BLD) for r in (out.recon, *out.prefix_recons)]).mean()
    sparsity = act.penalty(out.pre_acts, out.latents, coder.decoder_norm(), progress)
    aux = out.recon.new_zeros(())
    loss = recon + sparsity_weight * sparsity
    if act.uses_aux_loss and dead_LF is not None:
        k_aux = act.k_aux or coder.d_out // 2
        aux = aux_k_loss(coder, out.pre_acts, y_BLD - out.recon, dead_LF, k_aux, out.x)
        loss = loss + act.aux_coef * aux
    with torch.no_grad():
        fvu_L, l0_L = fvu(out.recon, y_BLD), coder.shard.total(out.latents.l0())
    return LossOutput(loss, recon, sparsity, aux, fvu_L, l0_L)
