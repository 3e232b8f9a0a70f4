"""One sparse coder for every architecture: encode → activation → decode.

Shapes: B batch, L layers (1 unless a cross-layer transcoder), F latents per layer, D model dims.
The architecture decides only which hooks feed x and y (config/arch.py) and these switches:
- cross_layer: latents at source layer i write to every target layer j ≥ i, each through its own
  decoder vector. W_dec[i] is [F, L−i, D_out] (circuit-tracer's layout), so a latent can never
  write to an earlier layer: there is no weight for it.
- skip: a learned linear map x → y per layer added to the reconstruction (skip transcoder, and a
  CLT if asked), zero at init.
- decoder_tying (CLT; crosslayer-coding's options): "none" is the layout above; "per_source" stores
  one vector per latent, W_dec[i] [F, 1, D], written to every target j ≥ i times a per-target scale
  W_dec_scale[i, f, j] (learned with per_target_scale, else fixed at 1 until activation scales fold
  in); "per_target" stores one matrix per target, W_dec[j] [F, 1, D], shared by the latents of every
  source i ≤ j (the same index f), so a latent's write to j is W_dec[j][f] whatever its source.
  `decoder(i)` / `decoders()` expand any tying into the untied layout exactly.
- feature_offset / feature_scale: per-latent [L, F] parameters applied to every active latent,
  a → (a + offset)·scale, before decoding (crosslayer-coding's enable_feature_offset / _scale).
- crosscoder (Anthropic, "Sparse crosscoders", 2024): acausal; one set of latents reads every
  covered layer and writes every covered layer. The L inputs are stacked into one encoder input
  ([B, 1, L·D_in]: W_enc [1, F, L·D_in], the sum over layers of W_enc[l]·x_l), and the one source's
  decoder is W_dec[0] [F, L, D], the CLT layout of a latent at layer 0. n_sources = 1, n_layers = L.
- transforms (MOLT, molt.py): each latent gates its own low-rank map of the input instead of a
  decoder vector; W_dec is empty.
- decoder_norm: how a latent's decoder vectors over several target layers combine into the norm
  its sparsity penalty weighs: "concat" (‖concatenation‖) or "sum" (Σ per-layer norms, the crosscoder
  paper's choice, which favours latents that write few layers).
Any architecture can be Matryoshka (`matryoshka`: nested prefix sizes): in training, the forward
also reconstructs from each prefix of the latents alone, for the loss to average.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nn_decomp.core import kernels
from nn_decomp.core.activations import Activation, Latents
from nn_decomp.config.arch import TYING
from nn_decomp.core.molt import LowRankTransforms
from nn_decomp.core.shard import NO_SHARD, LatentShard


class CoderOutput(NamedTuple):
    """Result of a forward pass. pre_acts: [B, S, F] (S = n_sources), detached when the sparse
    backward ran (and then, in training mode, a workspace that the next forward overwrites);
    latents: sparse or dense, [B, S, ·]; recon: [B, L, D_out]; x: the encoder's input [B, S, ·]
    (AuxK's sparse backward needs it);
    prefix_recons: in training, the reconstruction from each Matryoshka prefix alone."""

    pre_acts: Tensor
    latents: Latents
    recon: Tensor
    x: Tensor | None = None
    prefix_recons: tuple[Tensor, ...] = ()


class SparseCoder(nn.Module):
    shard = NO_SHARD  # this rank's share of the latents under tensor parallelism (shard.py)

    def __init__(self, d_in: int, d_out: int, n_latents: int, n_layers: int, activation: Activation,
                 cross_layer: bool = False, skip: bool = False, dec_init_norm: float = 0.1,
                 tied_init: bool = False, sparse_backward: bool = True, matryoshka: tuple[int, ...] = (),
                 decoder_tying: str = "none", per_target_scale: bool = False, feature_offset: bool = False,
                 feature_scale: bool = False, crosscoder: bool = False,
                 transforms: tuple[tuple[int, int], ...] = (), decoder_norm: str = "concat"):
        super().__init__()
        # sparse_backward=False keeps the dense reference path (tests compare the two); with
        # sparse_decoder=True it decodes the selected latents by embedding_bag all the same (a dense
        # encoder backward, sparse decoder: the baseline benchmarks/train_step.py also compares).
        self.sparse_backward = sparse_backward and (activation.sparse_output or activation.elementwise)
        self.sparse_decoder = False
        assert cross_layer or crosscoder or n_layers == 1, "only a CLT or a crosscoder spans several layers"
        assert decoder_tying in TYING and (cross_layer or decoder_tying == "none"), decoder_tying
        assert not transforms or (n_layers == 1 and not skip), "a MOLT replaces one layer's transcoder"
        self.d_in, self.d_out, self.n_latents, self.n_layers = d_in, d_out, n_latents, n_layers
        self.cross_layer, self.activation, self.matryoshka = cross_layer, activation, matryoshka
        self.decoder_tying, self.crosscoder, self.decoder_norm_kind = decoder_tying, crosscoder, decoder_norm
        L, Fl = n_layers, n_latents
        self.n_sources = S = 1 if crosscoder else L
        d_enc = L * d_in if crosscoder else d_in
        width = (lambda i: L - i) if decoder_tying == "none" else (lambda i: 1)
        self.W_dec = nn.ParameterList(
            [] if transforms else [nn.Parameter(torch.randn(Fl, width(i), d_out)) for i in range(S)])
        self.transforms = LowRankTransforms(transforms, d_in, d_out, dec_init_norm) if transforms else None
        assert self.transforms is None or self.transforms.n_transforms == n_latents, "one latent per transform"
        # per_source: the scale of source i's write to target j (j < i unused); a buffer when not
        # learned, still there for fold_scales to divide by each target's activation scale.
        scale = torch.ones(L, Fl, L) if decoder_tying == "per_source" else None
        if per_target_scale:
            self.W_dec_scale = nn.Parameter(scale)
        else:
            self.register_buffer("W_dec_scale", scale)
        self.feature_offset = nn.Parameter(torch.zeros(S, Fl)) if feature_offset else None
        self.feature_scale = nn.Parameter(torch.ones(S, Fl)) if feature_scale else None
        # Unit-norm activations renormalise after every step: start there, not at dec_init_norm.
        dec_init_norm = 1.0 if activation.unit_norm_decoder else dec_init_norm
        self.set_decoder_norm(dec_init_norm)
        # Tied init for autoencoders (encoder = decoder transpose, unit columns): latents start
        # reading the direction they write, which speeds up early training (Conerly et al. 2024).
        # W_enc is [L, F, D_in], a latent's encoder row contiguous (kernels.py: why).
        W_enc = torch.randn(S, Fl, d_enc) / d_enc ** 0.5
        if tied_init:
            assert d_in == d_out and not cross_layer, "tied init needs d_in == d_out, one source per target"
            W_enc = torch.stack([w.flatten(1).detach() / dec_init_norm for w in self.W_dec])
        self.W_enc = nn.Parameter(W_enc.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(S, Fl))
        self.b_dec = nn.Parameter(torch.zeros(L, d_out))
        self.W_skip = nn.Parameter(torch.zeros(L, d_in, d_out)) if skip else None
        if hasattr(activation, "init_threshold"):
            activation.init_threshold(S, Fl)
        self._pre_workspace: Tensor | None = None

    def set_shard(self, shard: LatentShard) -> None:
        """Make this coder (of n_latents = F / shard.size) one shard of a tensor-parallel dictionary:
        selection and sums over latents then span every shard."""
        assert shard.size == 1 or (self.transforms is None and not self.matryoshka), "config.validate refuses these"
        self.shard = self.activation.shard = shard

    # --- decoder geometry -------------------------------------------------------------------

    def decoder_norm(self) -> Tensor:
        """[S, F]: norm of each latent's decoder, concatenated over the layers it writes to (tied
        decoders: of its expanded decoder, computed without expanding), or summed over them
        (decoder_norm="sum"); a MOLT's: ‖U_t V_tᵀ‖_F of each transform."""
        if self.transforms is not None:
            return self.transforms.norms()[None]
        if self.decoder_norm_kind == "sum":
            return torch.stack([w.norm(dim=-1).sum(-1) for w in self.W_dec])
        if self.decoder_tying == "none":
            return torch.stack([w.flatten(1).norm(dim=1) for w in self.W_dec])
        sq_LF = torch.stack([w.flatten(1).pow(2).sum(1) for w in self.W_dec])
        if self.decoder_tying == "per_source":  # Σ_{j ≥ i} scale² · ‖w_i‖²
            later_LL = torch.ones(self.n_layers, self.n_layers, device=sq_LF.device).triu()
            return (sq_LF * torch.einsum("ifj,ij->if", self.W_dec_scale.pow(2), later_LL)).sqrt()
        return sq_LF.flip(0).cumsum(0).flip(0).sqrt()  # per_target: Σ_{j ≥ i} ‖w_j‖²

    def decoder_weights(self) -> list[nn.Parameter]:
        """The parameters latents write through: decoder vectors and learned scales, or a MOLT's maps (U and V)."""
        if self.transforms is not None:
            return list(self.transforms.parameters())
        return [*self.W_dec, *([self.W_dec_scale] if isinstance(self.W_dec_scale, nn.Parameter) else [])]

    def decoder_params(self) -> Tensor:
        """[S, F]: the decoder parameters each latent uses when active. Untied and per_target:
        (L−i)·D for source i (per_target's rows are shared with other sources' latents of the same
        index, counted for each); per_source: its one vector, plus its L−i scales when learned; a
        crosscoder's: L·D; a MOLT transform's: rank·(D_in + D_out)."""
        S, L, D = self.n_sources, self.n_layers, self.d_out
        if self.transforms is not None:
            return self.transforms.params_per_transform(self.d_in, self.d_out)[None]
        if self.decoder_tying == "per_source":
            learned = isinstance(self.W_dec_scale, nn.Parameter)
            per_source = [D + (L - i) * learned for i in range(S)]
        else:
            per_source = [(L - i) * D if self.cross_layer or self.crosscoder else D for i in range(S)]
        return torch.tensor(per_source)[:, None].expand(S, self.n_latents)

    def decoder(self, i: int) -> Tensor:
        """[F, L−i, D]: what each latent of source layer i writes to each target j ≥ i (tying
        expanded; feature_scale not folded in). The untied layout circuit-tracer stores."""
        if self.decoder_tying == "none":
            return self.W_dec[i]
        if self.decoder_tying == "per_source":
            return self.W_dec[i] * self.W_dec_scale[i, :, i:, None]
        return torch.cat([self.W_dec[j] for j in range(i, self.n_layers)], 1)

    def decoder_to(self, i: int, j: int) -> Tensor:
        """[F, D] what each latent of source layer i writes to target j ≥ i: `decoder(i)[:, j − i]`,
        without expanding the other targets."""
        if self.decoder_tying == "none":
            return self.W_dec[i][:, j - i]
        if self.decoder_tying == "per_source":
            return self.W_dec[i][:, 0] * self.W_dec_scale[i, :, j, None]
        return self.W_dec[j][:, 0]

    def decoders(self) -> list[Tensor]:
        """`decoder(i)` for every source layer i."""
        return [self.decoder(i) for i in range(self.n_sources)]

    @torch.no_grad()
    def set_decoder_norm(self, norm: float = 1.0) -> None:
        for w in self.W_dec:
            w.mul_(norm / w.flatten(1).norm(dim=1).clamp(min=1e-8)[:, None, None])

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component that would change decoder norms (Gao et al. 2024)."""
        for w in self.W_dec:
            if w.grad is None:
                continue
            w_FX, g_FX = w.flatten(1), w.grad.flatten(1)
            # g −= (g·w / w·w) w: two row dots and one in-place pass, no [F, X] temporaries.
            coef_F = torch.linalg.vecdot(g_FX, w_FX) / torch.linalg.vecdot(w_FX, w_FX).clamp(min=1e-16)
            g_FX.addcmul_(w_FX, coef_F[:, None], value=-1)

    # --- forward ----------------------------------------------------------------------------

    def token_scale(self, x_BLD: Tensor) -> Tensor | None:
        """[B, L, 1] √d_in / ‖x‖ per token and layer when the activation normalises tokens (x·s is
        encoded, the reconstruction is divided by s), else None. A crosscoder scales its stacked
        input as one: [B, 1, 1]."""
        if not self.activation.token_norm:
            return None
        x = self.stacked(x_BLD)
        return x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    def stacked(self, x_BLD: Tensor) -> Tensor:
        """The encoder's input [B, S, ·]: x itself, or a crosscoder's layers side by side [B, 1, L·D_in]."""
        return x_BLD.flatten(1)[:, None] if self.crosscoder else x_BLD

    def normalized(self, x_BLD: Tensor) -> Tensor:
        s = self.token_scale(x_BLD)
        return x_BLD if s is None else x_BLD * s

    def encode_pre(self, x_BLD: Tensor) -> Tensor:
        """Pre-activations of x already in the encoding space (as `forward` passes it on)."""
        return kernels.encode_pre(x_BLD, self.W_enc, self.b_enc)

    def layer_pre(self, x_ND: Tensor, i: int) -> Tensor:
        """[N, F] pre-activations of source layer i alone, from raw inputs (a crosscoder's: x_ND
        is its stacked input [N, L·D_in])."""
        return F.linear(self.normalized(x_ND), self.W_enc[i], self.b_enc[i])

    def encode_with_pre(self, x_BLD: Tensor) -> tuple[Latents, Tensor]:
        """Latents and pre-activations. With the sparse backward, selection runs without autograd
        and gradients come from the selected latents only (kernels.py); pre_acts are detached."""
        if self.sparse_backward:
            # autocast does not cast an out= GEMM: under it, baddbmm allocates its low-precision result
            out_LBF = self.pre_workspace(x_BLD) if self.training and not torch.is_autocast_enabled(
                x_BLD.device.type) else None
            return kernels.sparse_encode(x_BLD, self.W_enc, self.b_enc, self.activation, out_LBF)
        pre_BLF = self.encode_pre(x_BLD)
        return self.activation(pre_BLF), pre_BLF

    def pre_workspace(self, x_BLD: Tensor) -> Tensor:
        """[L, B, F] buffer for training's detached pre-activations, reused from step to step: on CPU
        a fresh [B, F] tensor each step costs its page faults on first touch (≈35 ms of a 550 ms
        step at B=4096, F=9216); CUDA's caching allocator reuses memory anyway."""
        shape = (self.n_sources, x_BLD.shape[0], self.n_latents)
        ws = self._pre_workspace
        if ws is None or ws.shape != shape or ws.dtype != x_BLD.dtype or ws.device != x_BLD.device:
            self._pre_workspace = ws = x_BLD.new_empty(shape)
        return ws

    def encode(self, x_BLD: Tensor) -> Latents:
        """Latents of raw inputs."""
        return self.encode_with_pre(self.stacked(self.normalized(x_BLD)))[0]

    def feature_values(self, latents: Latents, layers: slice = slice(None)) -> Latents:
        """The values the decoder multiplies: (a + offset)·scale where a ≠ 0 (latents of `layers`)."""
        if self.feature_offset is None and self.feature_scale is None:
            return latents
        values, active = latents.values, latents.values != 0
        for param, combine in ((self.feature_offset, torch.add), (self.feature_scale, torch.mul)):
            if param is not None:
                p_1LF = param[layers][None]
                per_value = p_1LF if latents.indices is None else p_1LF.expand(
                    values.shape[0], -1, -1).gather(-1, latents.indices)
                values = combine(values, per_value)
        return latents._replace(values=values * active)

    def decode(self, latents: Latents, x_BLD: Tensor | None = None, bias: bool = True) -> Tensor:
        """[B, L, D_out] reconstruction. Sparse latents decode as an embedding_bag over the selected
        rows, so the cost scales with k, not F. A MOLT needs `x_BLD` (its maps apply to it).
        bias=False: the latents' part alone (no b_dec, no skip: AuxK's reconstruction of a residual)."""
        latents = self.feature_values(latents)
        B, L, D = latents.values.shape[0], self.n_layers, self.d_out
        out_BLD = latents.values.new_zeros(B, L, D)
        if self.transforms is not None:
            out_BLD[:, 0] = self.transforms(latents, x_BLD[:, 0], latents.indices is not None)
        writes, starts = [], []  # [B, X, D] per source (untied) or per (source, target); X's first layer
        for i, w in enumerate(self.W_dec):
            if self.decoder_tying == "none":  # source i writes its last L − i layers (a crosscoder's: all)
                writes.append(self.decode_source(latents, i, w.flatten(1)).view(B, -1, D))
                starts.append(L - writes[-1].shape[1])
                continue
            for j in range(i, L):  # tied: one bag per (source, target), as many rows as untied
                if self.decoder_tying == "per_source":
                    writes.append(self.decode_source(latents, i, w[:, 0], self.W_dec_scale[i, :, j])[:, None])
                else:  # per_target: source i's latents through target j's shared matrix
                    writes.append(self.decode_source(latents, i, self.W_dec[j][:, 0])[:, None])
                starts.append(j)
        out_BLD = kernels.add_writes(out_BLD, starts, writes)
        out_BLD = self.shard.sum(out_BLD)  # tensor parallel: each shard decoded its own latents
        if not bias:
            return out_BLD
        out_BLD = out_BLD + self.b_dec
        if self.W_skip is not None and x_BLD is not None:
            out_BLD = out_BLD + torch.einsum("bld,lde->ble", x_BLD, self.W_skip)
        return out_BLD

    def decode_source(self, latents: Latents, i: int, w_FX: Tensor, weight_F: Tensor | None = None) -> Tensor:
        """[B, X] source layer i's latents (values times `weight_F` of their latent) through w_FX."""
        values = latents.values[:, i]
        if weight_F is not None:
            values = values * (weight_F if latents.indices is None else weight_F[latents.indices[:, i]])
        if latents.indices is None:
            return values @ w_FX
        grad_mask = None if latents.grad_mask is None else latents.grad_mask[:, i]
        return kernels.decode_source(latents.indices[:, i], values, w_FX, grad_mask)

    # --- one layer at a time: the replacement model (analysis/patching.py) ---------------------
    # A replacement model encodes layer j from the stream as the replacements before j left it, so
    # the coder runs layer by layer. These give exactly what `forward` gives in eval mode on the same
    # inputs (tests/test_patching.py asserts it for every architecture and activation).

    def sources(self, j: int) -> range:
        """The source layers that write to target layer j."""
        return range(j + 1) if self.cross_layer else range(j, j + 1)

    def encode_layer(self, x_ND: Tensor, i: int) -> Latents:
        """[N, 1, ·] latents of source layer i alone from raw inputs, as `encode` gives them in eval
        mode (a BatchTopK uses its threshold)."""
        return self.activation(self.layer_pre(x_ND, i)[:, None], layers=slice(i, i + 1))

    def layer_decoders(self, j: int) -> dict[int, Tensor]:
        """{i: [F, D]} the (contiguous) decoder slice each source i writes to target j through, tying
        expanded: made once per forward pass, not once per hook call."""
        if self.transforms is not None:
            return {}
        return {i: self.decoder_to(i, j).detach().contiguous() for i in self.sources(j)}

    def decode_layer(self, latents: dict[int, Latents], x_ND: Tensor, j: int,
                     decoders: dict[int, Tensor] | None = None) -> Tensor:
        """[N, D_out] raw reconstruction of target j from `encode_layer`'s latents of its sources
        ({i: latents}) and target j's own raw input x_ND (the token scale and skip connection read it)."""
        decoders = self.layer_decoders(j) if decoders is None else decoders
        values = {i: self.feature_values(latents[i], slice(i, i + 1)) for i in self.sources(j)}
        recon_ND = self.b_dec[j].expand(len(x_ND), -1).clone()
        for i, w_FD in decoders.items():
            recon_ND += self.decode_source(values[i], 0, w_FD)
        if self.transforms is not None:
            recon_ND += self.transforms(values[j], self.normalized(x_ND), values[j].indices is not None)
        if self.W_skip is not None:
            recon_ND += self.normalized(x_ND) @ self.W_skip[j]
        if (s_N1 := self.token_scale(x_ND)) is not None:
            recon_ND /= s_N1
        return recon_ND

    def forward(self, x_BLD: Tensor) -> CoderOutput:
        """Reconstruction of raw x. With token_norm, Trainer passes tokens already at norm √d_in
        (and targets scaled alike), so the loss is taken in that space; then s = 1 here."""
        s = self.token_scale(x_BLD)
        if s is not None:
            x_BLD = x_BLD * s
        x_enc = self.stacked(x_BLD)
        latents, pre_BLF = self.encode_with_pre(x_enc)
        # The dense reference decodes with dense GEMMs as well: the baseline the kernels must beat.
        sparse = self.sparse_backward or self.sparse_decoder
        decoded = latents if sparse else Latents(latents.dense(), None, self.n_latents)
        recons = [self.decode(decoded, x_BLD)]
        if self.training:
            recons += [self.decode(prefix(decoded, n), x_BLD) for n in self.matryoshka]
        if s is not None:
            recons = [r / s for r in recons]
        return CoderOutput(pre_BLF, latents, recons[0], x_enc, tuple(recons[1:]))

    @torch.no_grad()
    def fold_scales(self, scale_in_L: Tensor, scale_out_L: Tensor) -> None:
        """Fold activation normalisation into the weights: the coder was trained on x·s_in → y·s_out;
        afterwards it maps raw x to raw y with the same latents. A token-normalising coder's input
        scale cancels out: it must be 1 (train.init_coder)."""
        assert not self.activation.token_norm or bool((scale_in_L == 1).all()), "token_norm: no input scale"
        # a crosscoder's encoder row is [L·D_in]: layer l's block scales by scale_in[l]
        self.W_enc.mul_(scale_in_L.repeat_interleave(self.d_in) if self.crosscoder else scale_in_L[:, None, None])
        if self.transforms is not None:
            self.transforms.V.mul_(scale_in_L[0])
            self.transforms.U.div_(scale_out_L[0])
        if self.decoder_tying == "per_source":
            self.W_dec_scale.div_(scale_out_L)
        for i, w_FTD in enumerate(self.W_dec):
            if self.decoder_tying == "none":
                w_FTD.div_(scale_out_L[i:][None, :, None])
            elif self.decoder_tying == "per_target":
                w_FTD.div_(scale_out_L[i])
        self.b_dec.div_(scale_out_L[:, None])
        if self.W_skip is not None:
            self.W_skip.mul_((scale_in_L / scale_out_L)[:, None, None])


def prefix(latents: Latents, n: int) -> Latents:
    """The same latents with every one at index ≥ n zeroed: a Matryoshka prefix of one selection.
    Sparse latents stay [B, L, K] (the decoder skips zeros, so a prefix costs its own entries)."""
    if latents.indices is None:
        keep = torch.arange(latents.n_latents, device=latents.values.device) < n
        return latents._replace(values=latents.values * keep)
    keep = latents.indices < n
    grad_mask = keep if latents.grad_mask is None else keep & latents.grad_mask
    return latents._replace(values=latents.values * keep, grad_mask=grad_mask)
