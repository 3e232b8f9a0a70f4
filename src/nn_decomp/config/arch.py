"""`arch:` (conf/arch/): which hooks a dictionary reads and writes, its switches, and the names the
rest of the package asks of an architecture (which archs are transcoders, autoencoders, multi-layer)."""
from dataclasses import dataclass, field

from omegaconf import MISSING

from nn_decomp.config.errors import require

ARCHS = ("sae", "transcoder", "skip_transcoder", "clt", "crosscoder", "molt")
MULTI_LAYER = ("clt", "crosscoder")  # the archs that cover several layers
TRANSCODERS = ("transcoder", "skip_transcoder", "clt")  # per-latent writes into another space than they read
AUTOENCODERS = ("sae", "crosscoder")  # reconstruct what they read
CHECKPOINT_ONLY = ("crosscoder", "molt")  # archs no export format holds: our checkpoint is theirs
DECODER_NORMS = ("concat", "sum")
TYING = ("none", "per_source", "per_target")  # arch.decoder_tying (coder.py reads it from here)


@dataclass
class ArchConfig:
    name: str = MISSING
    """sae | transcoder | skip_transcoder | clt | crosscoder | molt."""
    layers: list[int] = field(default_factory=lambda: [2])
    """Layer(s) the dictionary covers; a CLT or a crosscoder needs at least two."""
    hook_in: str = "blocks.{layer}.hook_resid_post"
    """TransformerLens hook feeding the encoder, `{layer}` filled per layer."""
    hook_out: str | None = None
    """Hook to reconstruct; null means the input hook (an autoencoder)."""
    n_latents: int = 2048
    """Latents per layer (a crosscoder's are shared by its layers; a MOLT's are its transforms)."""
    dec_init_norm: float = 0.1
    """Initial norm of each decoder vector (concatenated over target layers for a CLT)."""
    unit_norm_decoder: bool | None = None
    """Renormalise every decoder vector to norm 1 after each step (and project its gradient off it).
    null: yes for an autoencoder (sae, crosscoder) whose activation compares or counts latents (TopK,
    BatchTopK, JumpReLU l0/target: Gao et al., sparsify), no for a transcoder, skip transcoder or CLT,
    whose writes live in another space than their reads (sparsify's transcoders keep the norm free;
    exp_005: TopK transcoder 0.81 → 0.96 mean max-cos freed); MOLT keeps its activation's choice.
    true / false force it (true with ReLU or tanh-JumpReLU: their penalty then sees norm 1)."""
    skip: bool = False
    """A learned linear map x → y per layer added to the reconstruction (arch=skip_transcoder sets it;
    a CLT may have one too)."""
    decoder_tying: str = "none"
    """CLT decoders: none (one vector per latent and target layer) | per_source (one vector per latent,
    shared by its target layers) | per_target (one matrix per target layer, shared by every source)."""
    per_target_scale: bool = False
    """per_source: learn a scale per latent and target layer."""
    feature_offset: bool = False
    """Learn a per-latent offset added to active latents before decoding."""
    feature_scale: bool = False
    """Learn a per-latent scale applied to active latents before decoding."""
    decoder_norm: str = "concat"
    """CLT / crosscoder: the norm of a latent's decoder vectors over its target layers that weighs its
    sparsity penalty (ReLU, JumpReLU tanh): concat (‖concatenation‖) | sum (Σ per-layer norms, the
    crosscoder paper's, which favours latents that write few layers)."""
    molt_ranks: list[int] = field(default_factory=list)
    """arch=molt: the ranks of its low-rank transforms, e.g. [64, 32, 16, 8]. The n_latents transforms
    (one gate each) are split so that every rank holds the same number of parameters, count ∝ 1/rank
    (the MOLT paper's N of rank 512, 2N of 256, …): `molt_groups`."""
    matryoshka: list[int] = field(default_factory=list)
    """Nested prefix sizes, e.g. [128, 512] (Matryoshka; Bussmann et al. 2025): the loss averages the
    reconstruction error of the first m latents (of the same selection) over every m and of all
    n_latents, so early latents learn general features. Empty: off."""

    def __post_init__(self):
        require(self.name in ARCHS, f"arch.name={self.name!r}: choose one of {ARCHS}")
        require(self.n_latents > 0, f"arch.n_latents={self.n_latents}: must be positive")
        require(self.decoder_tying in TYING, f"arch.decoder_tying={self.decoder_tying!r}: choose one of {TYING}")
        require(self.decoder_tying == "none" or self.name == "clt",
                f"arch.decoder_tying={self.decoder_tying} ties a CLT's decoders across layers: use arch=clt")
        require(not self.per_target_scale or self.decoder_tying == "per_source",
                "arch.per_target_scale scales the shared vectors of arch.decoder_tying=per_source: set that too")
        require(self.skip == (self.name == "skip_transcoder") or self.name == "clt",
                f"arch.skip={self.skip} with arch={self.name}: a skip connection comes with arch=skip_transcoder "
                "(or arch=clt arch.skip=true)")
        m = list(self.matryoshka)
        require(m == sorted(set(m)) and all(0 < n < self.n_latents for n in m),
                f"arch.matryoshka={m}: give increasing prefix sizes between 0 and arch.n_latents={self.n_latents} "
                "(the full dictionary is always the last prefix)")
        if self.name in MULTI_LAYER:
            require(len(self.layers) >= 2, f"arch.layers={self.layers}: arch={self.name} needs >= 2 layers; "
                                           "use arch=transcoder (or sae) for one")
        else:
            require(len(self.layers) == 1, f"arch.layers={self.layers}: arch={self.name} covers one layer; "
                                           "use arch=clt or arch=crosscoder for several")
        require(self.decoder_norm in DECODER_NORMS, f"arch.decoder_norm={self.decoder_norm!r}: choose one of {DECODER_NORMS}")
        require(self.decoder_norm == "concat" or (self.name in MULTI_LAYER and self.decoder_tying == "none"),
                f"arch.decoder_norm={self.decoder_norm} sums per-layer norms of an untied CLT or a crosscoder: "
                "drop it (or use arch=crosscoder, or arch=clt with arch.decoder_tying=none)")
        ranks = list(self.molt_ranks)
        if self.name == "molt":
            require(ranks and ranks == sorted(set(ranks), reverse=True) and ranks[-1] > 0,
                    f"arch.molt_ranks={ranks}: give distinct positive ranks, largest first, e.g. [64,32,16,8]")
            require(min(c for c, _ in molt_groups(self.n_latents, ranks)) > 0,
                    f"arch.n_latents={self.n_latents} leaves rank {ranks[0]} of arch.molt_ranks={ranks} no transform: "
                    "raise arch.n_latents or drop the largest ranks")
        else:
            require(not ranks, "arch.molt_ranks is arch=molt's: use arch=molt or drop it")
        require(sorted(set(self.layers)) == list(self.layers),
                f"arch.layers={self.layers}: give distinct increasing layers")


def molt_groups(n_transforms: int, ranks: list[int]) -> list[tuple[int, int]]:
    """[(count, rank)]: n_transforms split over `ranks` with count ∝ 1/rank (the same parameters per
    rank), rounded down, the remainder going to the smallest rank. Here, not in core/molt.py which
    builds the transforms: ArchConfig checks arch.n_latents with it, and this package imports no torch."""
    share = [1 / r for r in ranks]
    counts = [int(n_transforms * s / sum(share)) for s in share]
    counts[-1] += n_transforms - sum(counts)
    return list(zip(counts, ranks))


def arch_hooks(arch) -> tuple[list[str], list[str]]:
    """(hooks_in, hooks_out): one TransformerLens hook name per covered layer."""
    hook_out = arch.hook_out or arch.hook_in
    return [arch.hook_in.format(layer=n) for n in arch.layers], [hook_out.format(layer=n) for n in arch.layers]
