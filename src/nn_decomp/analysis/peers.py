"""Peers: SAELens' TopK / BatchTopK / JumpReLU / ReLU training SAEs and sparsify's TopK SparseCoder (SAE
or transcoder), built and stepped in this one place for the quality comparisons (exp_002 `--peers`,
exp_005) and the speed table (benchmarks/train_step.py).

Each peer keeps its own method: its init, its loss terms with its own default coefficients (read from
the library: SAELens' config defaults and `get_coefficients`, sparsify's `TrainConfig.auxk_alpha`), its
decoder handling (SAELens rescales activations by the decoder norm, sparsify renormalises an SAE
decoder). What is ours to set is set as in our run (`PeerTrainer`): the optimizer (train.optimizer), the
lr schedule and the dead-latent rule (no firing for train.dead_tokens tokens) that feeds each peer's
AuxK; gradient clipping is the caller's choice (train.grad_clip for quality, the peer's own trainer's
for speed). Needs `pip install -e .[bench]`.
"""
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from nn_decomp.config.arch import arch_hooks
from nn_decomp.core.coder import SparseCoder
from nn_decomp.core.losses import fvu
from nn_decomp.data.sources import take_tokens
from nn_decomp.runtime.checkpoint import build_coder, save_checkpoint
from nn_decomp.runtime.trainer import lr_scheduler
from nn_decomp.runtime.training import INIT_BATCHES, norm_scale, setup

PEERS = ("saelens_topk", "saelens_batchtopk", "saelens_jumprelu", "saelens_relu", "sparsify_topk")
# SAETrainer._train_step clips at this norm, a literal there (not in SAELens' config)
SAELENS_GRAD_CLIP = 1.0


class PeerForward(NamedTuple):
    """One training forward: the loss to step on, the latents that fired on the batch ([F] bool) and
    the batch's mean L0 (latents per token, a scalar tensor)."""

    loss: Tensor
    fired_F: Tensor
    l0: Tensor


class Peer(NamedTuple):
    """module: its parameters are trained. loss(x, y, dead_F) -> PeerForward. latents(x) -> [B, F]
    inference activations; reconstruct(x) -> ŷ; decoder() -> [F, D] decoder rows. own_grad_clip: the
    clip its own trainer applies (None: none). before_forward / before_update: the peer's own decoder
    steps around the optimizer."""

    module: nn.Module
    loss: Callable[[Tensor, Tensor, Tensor], PeerForward]
    latents: Callable[[Tensor], Tensor]
    reconstruct: Callable[[Tensor], Tensor]
    decoder: Callable[[], Tensor]
    own_grad_clip: float | None
    before_forward: Callable[[], None] = lambda: None
    before_update: Callable[[], None] = lambda: None


def fired(acts_BF: Tensor) -> tuple[Tensor, Tensor]:
    """Dense latents -> (fired_F, mean L0)."""
    active_BF = acts_BF != 0
    return active_BF.any(0), active_BF.sum(-1).float().mean()


def our_weights(coder: SparseCoder) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A single-layer coder's (W_enc_FD, b_enc_F, W_dec_FD, b_dec_D): what a peer built `like` it copies."""
    return coder.W_enc[0], coder.b_enc[0], coder.W_dec[0][:, 0], coder.b_dec[0]


def saelens_options(act: str, like: SparseCoder) -> dict:
    """SAELens config fields under which its `act` computes what our coder `like` computes: b_dec not
    subtracted from x (ours does not), JumpReLU's bandwidth / penalty / coefficient, ReLU's L1 coefficient."""
    ours = like.activation
    options = {"apply_b_dec_to_input": False}
    if act == "jumprelu":
        options |= dict(jumprelu_bandwidth=ours.bandwidth, jumprelu_tanh_scale=ours.tanh_scale,
                        jumprelu_sparsity_loss_mode="step" if ours.penalty_kind == "l0" else "tanh",
                        l0_coefficient=ours.sparsity_coef)
    if act == "relu":
        options["l1_coefficient"] = ours.l1_coef
    return options


def saelens_sae(act: str, d_in: int, n_latents: int, k: int, like: SparseCoder | None = None) -> Peer:
    # SAELens imported here: an optional peer library (the bench extra), heavy to import
    from sae_lens.saes import batchtopk_sae, jumprelu_sae, standard_sae, topk_sae
    from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput

    sae_class, config_class = {
        "topk": (topk_sae.TopKTrainingSAE, topk_sae.TopKTrainingSAEConfig),
        "batchtopk": (batchtopk_sae.BatchTopKTrainingSAE, batchtopk_sae.BatchTopKTrainingSAEConfig),
        "jumprelu": (jumprelu_sae.JumpReLUTrainingSAE, jumprelu_sae.JumpReLUTrainingSAEConfig),
        "relu": (standard_sae.StandardTrainingSAE, standard_sae.StandardTrainingSAEConfig)}[act]
    options = {"d_in": d_in, "d_sae": n_latents} | ({"k": k} if act in ("topk", "batchtopk") else {})
    sae = sae_class(config_class(**options | (saelens_options(act, like) if like is not None else {})))
    if like is not None:
        with torch.no_grad():
            W_enc_FD, b_enc_F, W_dec_FD, b_dec_D = our_weights(like)
            sae.W_enc.copy_(W_enc_FD.T)
            sae.b_enc.copy_(b_enc_F)
            sae.W_dec.copy_(W_dec_FD)
            sae.b_dec.copy_(b_dec_D)
            if act == "jumprelu":
                sae.threshold.copy_(like.activation.threshold[0])
    # SAETrainer's coefficients: the config's (no warm-up by default, so each is its value)
    coefficients = {name: c.value if isinstance(c, TrainCoefficientConfig) else c
                    for name, c in sae.get_coefficients().items()}
    step = [0]

    def loss(x, y, dead_F):
        out = sae.training_forward_pass(TrainStepInput(x, coefficients, dead_F, step[0], False))
        step[0] += 1
        return PeerForward(out.loss, *fired(out.feature_acts))

    @torch.no_grad()
    def latents(x):
        if act != "batchtopk":
            return sae.encode_with_hidden_pre(x)[0]
        # BatchTopK infers as a JumpReLU at its learnt global threshold (what SAELens saves)
        pre = sae.encode_with_hidden_pre(x)[1]
        return pre.relu() * (pre > sae.topk_threshold)

    @torch.no_grad()
    def reconstruct(x):
        return sae.decode(latents(x))

    def decoder():
        return sae.W_dec.detach()

    return Peer(sae, loss, latents, reconstruct, decoder, SAELENS_GRAD_CLIP)


def sparsify_coder(d_in: int, n_latents: int, k: int, transcode: bool, like: SparseCoder | None = None) -> Peer:
    # sparsify imported here: an optional peer library (the bench extra), heavy to import
    from sparsify import SparseCoder as SparsifyCoder, SparseCoderConfig

    sc = SparsifyCoder(d_in, SparseCoderConfig(num_latents=n_latents, k=k, transcode=transcode))
    if like is not None:
        with torch.no_grad():
            W_enc_FD, b_enc_F, W_dec_FD, b_dec_D = our_weights(like)
            sc.encoder.weight.copy_(W_enc_FD)
            sc.encoder.bias.copy_(b_enc_F)
            sc.W_dec.copy_(W_dec_FD)
            sc.b_dec.copy_(b_dec_D)
    auxk_alpha = sparsify_auxk_alpha()

    def loss(x, y, dead_F):  # sparsify.Trainer.fit, loss_fn="fvu" (its multi-TopK weight 1/8 is a literal there)
        out = sc(x, y, dead_mask=dead_F)
        fired_F = torch.zeros(n_latents, dtype=torch.bool, device=x.device)
        fired_F[out.latent_indices.flatten()] = True
        return PeerForward(out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8, fired_F,
                           (out.latent_acts != 0).sum(-1).float().mean())

    @torch.no_grad()
    def latents(x):
        enc = sc.encode(x)
        return enc.top_acts.new_zeros(len(x), n_latents).scatter(-1, enc.top_indices, enc.top_acts)

    @torch.no_grad()
    def reconstruct(x):
        enc = sc.encode(x)
        return sc.decode(enc.top_acts, enc.top_indices)

    def decoder():
        return sc.W_dec.detach()

    # its Trainer does not clip gradients
    if not (sc.cfg.normalize_decoder and not transcode):
        return Peer(sc, loss, latents, reconstruct, decoder, None)
    # an SAE: unit decoder before the forward, gradient parallel to it removed (sparsify.Trainer.fit)
    return Peer(sc, loss, latents, reconstruct, decoder, None, sc.set_decoder_norm_to_unit_norm,
                sc.remove_gradient_parallel_to_decoder_directions)


def sparsify_auxk_alpha() -> float:
    from sparsify import TrainConfig  # an optional peer library (module docstring)
    return TrainConfig.__dataclass_fields__["auxk_alpha"].default


def build_peer(name: str, d_in: int, n_latents: int, k: int, transcode: bool, like: SparseCoder | None = None) -> Peer:
    """Peer `name` (one of PEERS: library_activation) at its own init, or, given our single-layer coder
    `like`, starting from its weights and computing what it computes (`saelens_options`)."""
    assert name in PEERS, f"peer {name!r}: choose one of {PEERS}"
    library, act = name.split("_")
    if library == "sparsify":
        return sparsify_coder(d_in, n_latents, k, transcode, like)
    assert not transcode, "SAELens trains SAEs only here"
    return saelens_sae(act, d_in, n_latents, k, like)


class PeerTrainer:
    """A peer's training steps under our optimizer (train.optimizer), lr schedule over `total_steps` and
    dead-latent rule (`since_fired_F` ≥ train.dead_tokens: dead, fed to its AuxK), clipping gradients at
    `grad_clip` (None: not at all). Build it after the peer is on its device."""

    def __init__(self, peer: Peer, train_cfg, total_steps: int, n_latents: int, grad_clip: float | None):
        self.peer, self.dead_tokens, self.grad_clip = peer, train_cfg.dead_tokens, grad_clip
        self.optimizer = instantiate(train_cfg.optimizer)(peer.module.parameters())
        self.scheduler = lr_scheduler(self.optimizer, train_cfg, total_steps)
        device = next(peer.module.parameters()).device
        self.since_fired_F = torch.zeros(n_latents, dtype=torch.long, device=device)

    def step(self, x_BD: Tensor, y_BD: Tensor) -> Tensor:
        """One step on rows x → y (an SAE: y = x); returns the batch's mean L0 (reading it syncs a device)."""
        peer = self.peer
        peer.before_forward()
        out = peer.loss(x_BD, y_BD, self.since_fired_F >= self.dead_tokens)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        peer.before_update()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(peer.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.since_fired_F += len(x_BD)
        self.since_fired_F[out.fired_F] = 0
        return out.l0


def train_peer(peer: Peer, next_batch: Callable[[], tuple[Tensor, Tensor]], train_cfg, n_latents: int) -> None:
    """Train `peer` for train.n_tokens // train.batch_size steps with our optimizer, schedule, clipping
    and dead-latent rule, on the rows `next_batch` gives (our run's stream: [B, 1, D] x and y)."""
    total = train_cfg.n_tokens // train_cfg.batch_size
    trainer = PeerTrainer(peer, train_cfg, total, n_latents, train_cfg.grad_clip)
    for _ in range(total):
        trainer.step(*(rows[:, 0] for rows in next_batch()))


@torch.no_grad()
def held_out(peer: Peer, x_ND: Tensor, y_ND: Tensor, batch_size: int) -> dict:
    """The peer's held-out FVU, L0 and fraction of latents that never fire, in eval mode."""
    peer.module.eval()
    latents = torch.cat([peer.latents(x) for x in x_ND.split(batch_size)])
    recon = torch.cat([peer.reconstruct(x) for x in x_ND.split(batch_size)])
    return {"nmse": fvu(recon[:, None], y_ND[:, None]).item(), "l0": (latents != 0).float().sum(-1).mean().item(),
            "dead_fraction_eval": (latents == 0).all(0).float().mean().item()}


def train_peer_on_run(name: str, cfg, out: Path | None = None, meta: dict | None = None) -> dict:
    """Peer `name` trained on exactly the rows our run `cfg` trained on (its stream after init_coder's
    batches, each layer scaled to E‖x‖² = d by the same init batches as ours), scored on the run's
    held-out rows. FVU does not depend on that scale, so it compares as is with the run's own held-out
    nmse (metrics.json, the same rows; eval.nmse is the evaluator's, on other tokens). `out`: also save
    a TopK SAE peer there as our checkpoint (`peer_checkpoint`; `meta`: the run's metadata)."""
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
    if out is not None:
        peer_checkpoint(name, peer, s_in, cfg, meta, out)
    return held_out(peer, x_eval[:, 0] * s_in, y_eval[:, 0] * s_out, cfg.train.batch_size)


@torch.no_grad()
def topk_sae_weights(name: str, peer: Peer, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A TopK SAE peer trained on rows × `scale` as our TopK SAE on raw rows computes it: (W_enc_FD,
    b_enc_F, W_dec_FD, b_dec_D) with pre = x W_encᵀ + b_enc, the k largest kept, decoded by W_dec. Both
    peers subtract b_dec before encoding (folded into b_enc); SAELens' TopK also multiplies the
    pre-activations by the decoder row norms and divides them back out when decoding (folded: unit rows)."""
    module = peer.module
    if name == "sparsify_topk":
        W_enc, b_enc, W_dec, b_dec = module.encoder.weight, module.encoder.bias, module.W_dec, module.b_dec
    else:
        assert name == "saelens_topk" and module.cfg.apply_b_dec_to_input, name
        W_enc, b_enc, W_dec, b_dec = module.W_enc.T, module.b_enc, module.W_dec, module.b_dec
        if module.cfg.rescale_acts_by_decoder_norm:
            norms = W_dec.norm(dim=-1)
            W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    b_enc = b_enc - W_enc @ b_dec
    return W_enc * scale, b_enc, W_dec / scale, b_dec / scale


def peer_checkpoint(name: str, peer: Peer, scale: float, cfg, meta: dict, out: Path) -> Path:
    """Save a trained TopK SAE peer as our checkpoint of the run it trained on (`cfg`, `meta`): loadable
    by load_dictionary, evaluable and exportable like our own (SAEBench scores it through that path)."""
    assert cfg.arch.name == "sae" and cfg.act.k is not None, "only TopK SAE peers are saved as checkpoints"
    W_enc, b_enc, W_dec, b_dec = topk_sae_weights(name, peer, scale)
    coder = build_coder(cfg, W_enc.shape[1], W_dec.shape[1])
    state = coder.state_dict() | {"W_enc": W_enc[None], "b_enc": b_enc[None], "W_dec.0": W_dec[:, None],
                                  "b_dec": b_dec[None]}
    coder.load_state_dict(state)
    save_checkpoint(out, coder.eval(), cfg, meta | {"peer": name})
    return out
