"""Peers' dictionaries trained on our batches, for quality comparisons on identical data:
SAELens' TopK / BatchTopK training SAEs and sparsify's TopK SparseCoder (SAE or transcoder).

Each peer keeps its own method: its init, its loss terms with its own default coefficients (SAELens
AuxK weight 1, sparsify auxk_alpha 1/32), its decoder handling (SAELens rescales activations by the
decoder norm, sparsify renormalises an SAE decoder). What is ours to set is set as in our run: the
optimizer (the run's train.optimizer), the lr schedule, gradient clipping, and the dead-latent rule
(no firing for train.dead_tokens tokens) that feeds each peer's AuxK. Needs `pip install -e .[bench]`.
"""
from collections.abc import Callable
from typing import NamedTuple

import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from nn_decomp.core.losses import fvu
from nn_decomp.runtime.trainer import lr_lambda

PEERS = ("saelens_topk", "saelens_batchtopk", "sparsify_topk")


class Peer(NamedTuple):
    """module: its parameters are trained. loss(x, y, dead_F) -> (loss, fired_F): one training forward.
    latents(x) -> [B, F] inference activations; reconstruct(x) -> ŷ; decoder() -> [F, D] decoder
    rows. before_forward / before_update: the peer's own decoder steps around the optimizer."""

    module: nn.Module
    loss: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
    latents: Callable[[Tensor], Tensor]
    reconstruct: Callable[[Tensor], Tensor]
    decoder: Callable[[], Tensor]
    before_forward: Callable[[], None] = lambda: None
    before_update: Callable[[], None] = lambda: None


def saelens_sae(name: str, d_in: int, n_latents: int, k: int) -> Peer:
    from sae_lens.saes import batchtopk_sae, topk_sae
    from sae_lens.saes.sae import TrainStepInput

    if name == "saelens_topk":
        sae = topk_sae.TopKTrainingSAE(topk_sae.TopKTrainingSAEConfig(k=k, d_in=d_in, d_sae=n_latents))
    else:
        sae = batchtopk_sae.BatchTopKTrainingSAE(
            batchtopk_sae.BatchTopKTrainingSAEConfig(k=k, d_in=d_in, d_sae=n_latents))
    step = [0]

    def loss(x, y, dead_F):
        out = sae.training_forward_pass(TrainStepInput(x, {}, dead_F, step[0], False))
        step[0] += 1
        return out.loss, (out.feature_acts != 0).any(0)

    @torch.no_grad()
    def latents(x):
        if name == "saelens_topk":
            return sae.encode_with_hidden_pre(x)[0]
        # BatchTopK infers as a JumpReLU at its learnt global threshold (what SAELens saves)
        pre = sae.encode_with_hidden_pre(x)[1]
        return pre.relu() * (pre > sae.topk_threshold)

    @torch.no_grad()
    def reconstruct(x):
        return sae.decode(latents(x))

    def decoder():
        return sae.W_dec.detach()

    return Peer(sae, loss, latents, reconstruct, decoder)


def sparsify_coder(d_in: int, n_latents: int, k: int, transcode: bool) -> Peer:
    from sparsify import SparseCoder, SparseCoderConfig

    sc = SparseCoder(d_in, SparseCoderConfig(num_latents=n_latents, k=k, transcode=transcode))
    auxk_alpha = sparsify_auxk_alpha()

    def loss(x, y, dead_F):  # sparsify.Trainer.fit, loss_fn="fvu"
        out = sc(x, y, dead_mask=dead_F)
        fired_F = torch.zeros(n_latents, dtype=torch.bool)
        fired_F[out.latent_indices.flatten()] = True
        return out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8, fired_F

    @torch.no_grad()
    def latents(x):
        enc = sc.encode(x)
        return torch.zeros(len(x), n_latents).scatter(-1, enc.top_indices, enc.top_acts)

    @torch.no_grad()
    def reconstruct(x):
        enc = sc.encode(x)
        return sc.decode(enc.top_acts, enc.top_indices)

    def decoder():
        return sc.W_dec.detach()

    if not (sc.cfg.normalize_decoder and not transcode):
        return Peer(sc, loss, latents, reconstruct, decoder)
    # an SAE: unit decoder before the forward, gradient parallel to it removed (sparsify.Trainer.fit)
    return Peer(sc, loss, latents, reconstruct, decoder, sc.set_decoder_norm_to_unit_norm,
                sc.remove_gradient_parallel_to_decoder_directions)


def sparsify_auxk_alpha() -> float:
    from sparsify import TrainConfig
    return TrainConfig.__dataclass_fields__["auxk_alpha"].default


def build_peer(name: str, d_in: int, n_latents: int, k: int, transcode: bool) -> Peer:
    assert name in PEERS, f"peer {name!r}: choose one of {PEERS}"
    if name == "sparsify_topk":
        return sparsify_coder(d_in, n_latents, k, transcode)
    assert not transcode, "SAELens trains SAEs only here"
    return saelens_sae(name, d_in, n_latents, k)


def train_peer(peer: Peer, next_batch: Callable[[], tuple[Tensor, Tensor]], train_cfg, n_latents: int) -> None:
    """Train `peer` for train.n_tokens // train.batch_size steps with our optimizer, schedule, clipping
    and dead-latent rule, on the rows `next_batch` gives (our run's stream: [B, 1, D] x and y)."""
    total = train_cfg.n_tokens // train_cfg.batch_size
    optimizer = instantiate(train_cfg.optimizer)(peer.module.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(
        s, train_cfg.warmup_steps, total, train_cfg.decay_fraction, train_cfg.decay))
    since_fired_F = torch.zeros(n_latents, dtype=torch.long)
    for _ in range(total):
        x, y = (rows[:, 0] for rows in next_batch())
        peer.before_forward()
        loss, fired_F = peer.loss(x, y, since_fired_F >= train_cfg.dead_tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        peer.before_update()
        torch.nn.utils.clip_grad_norm_(peer.module.parameters(), train_cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        since_fired_F += len(x)
        since_fired_F[fired_F] = 0


@torch.no_grad()
def held_out(peer: Peer, x_ND: Tensor, y_ND: Tensor, batch_size: int) -> dict:
    """The peer's held-out FVU, L0 and fraction of latents that never fire, in eval mode."""
    peer.module.eval()
    latents = torch.cat([peer.latents(x) for x in x_ND.split(batch_size)])
    recon = torch.cat([peer.reconstruct(x) for x in x_ND.split(batch_size)])
    return {"nmse": fvu(recon[:, None], y_ND[:, None]).item(), "l0": (latents != 0).float().sum(-1).mean().item(),
            "dead_fraction_eval": (latents == 0).all(0).float().mean().item()}


def train_peer_on_run(name: str, cfg) -> dict:
    """Peer `name` trained on exactly the rows our run `cfg` trained on (its stream after init_coder's
    batches, each layer scaled to E‖x‖² = d by the same init batches as ours), scored on the run's
    held-out rows. FVU does not depend on that scale, so it compares as is with the run's own held-out
    nmse (metrics.json, the same rows; eval.nmse is the evaluator's, on other tokens)."""
    from nn_decomp.config import arch_hooks
    from nn_decomp.data.sources import take_tokens
    from nn_decomp.runtime.training import INIT_BATCHES, norm_scale, setup

    hooks_in, hooks_out = arch_hooks(cfg.arch)
    assert len(hooks_in) == 1, "peers train single-layer dictionaries"
    _, store, (x_eval, y_eval), _ = setup(cfg)
    try:
        x0, y0 = take_tokens(store, INIT_BATCHES * store.batch_size)
        s_in, s_out = (norm_scale(x0), norm_scale(y0)) if cfg.train.normalize_activations else (1.0, 1.0)
        peer = build_peer(name, x0.shape[-1], cfg.arch.n_latents, cfg.act.k, transcode=hooks_in != hooks_out)

        def next_batch():
            x, y = store.next_batch()
            return x * s_in, y * s_out

        train_peer(peer, next_batch, cfg.train, cfg.arch.n_latents)
    finally:
        store.close()
    return held_out(peer, x_eval[:, 0] * s_in, y_eval[:, 0] * s_out, cfg.train.batch_size)
