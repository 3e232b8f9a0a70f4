"""The entry configs of the commands besides train and cache (conf/{evaluate,convert,export}.yaml
start from `base_<command>`). They share `CommandConfig` (the checkpoint read, where the result goes),
and those that run the checkpoint's LM `LMCommandConfig` too."""
from dataclasses import dataclass, field
from typing import Any

from nn_decomp.config.errors import require


@dataclass
class CommandConfig:
    """What every command over a trained dictionary takes."""

    checkpoint: str | None = None
    """A checkpoint dir (outputs/runs/.../checkpoint)."""
    checkpoints: list[str] = field(default_factory=list)
    """Several checkpoints taken as one set (a transcoder per layer: one replacement model, one
    conversion pass, one circuit-tracer transcoder_set), instead of or besides `checkpoint`."""
    out: str | None = None
    """Where the result goes (each command's docstring gives its default)."""
    overwrite: bool = False
    """Replace an existing `out`."""


@dataclass
class LMCommandConfig(CommandConfig):
    """A command that runs the LM the checkpoint was trained on."""

    device: str = "auto"
    dtype: str = "float32"
    cache_dir: str = "${paths.cache_dir}"
    model: Any = None
    """Optional `model=<option>`: fail unless the checkpoint was trained on that model."""
    paths: Any = None


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
class EvaluateConfig(LMCommandConfig):
    """`python -m nn_decomp.evaluate` (conf/evaluate.yaml). `out`: the dir for eval.json (default: the
    checkpoint dir; required for `checkpoints`); `overwrite` replaces an existing eval.json."""

    eval: EvalSettings = field(default_factory=EvalSettings)


ESTIMATORS = ("rate", "min")


@dataclass
class ConvertConfig(LMCommandConfig):
    """`python -m nn_decomp.convert` (conf/convert.yaml): `checkpoint`, a TopK / BatchTopK one, becomes
    a new checkpoint dir `out` (default: <checkpoint>_jumprelu next to the source); a set
    (`checkpoints`) from one LM pass, each next to its source."""

    to: str = "jumprelu"
    """Target activation; only jumprelu."""
    estimator: str = "rate"
    """rate (keep each latent's firing frequency) or min (smallest selected pre-activation)."""
    calibrate: bool = False
    """Bisect a per-layer scale on the thresholds so each layer's L0 matches the source's."""
    n_tokens: int = 16384
    """Held-out tokens for the threshold statistics."""
    n_eval_tokens: int = 8192
    """Further held-out tokens for the before/after report."""

    def __post_init__(self):
        require(self.to == "jumprelu", f"to={self.to}: only to=jumprelu is supported")
        require(self.estimator in ESTIMATORS, f"estimator={self.estimator!r}: choose one of {ESTIMATORS}")


@dataclass
class ExportConfig(CommandConfig):
    """`python -m nn_decomp.export` (conf/export.yaml): `checkpoint` written in `format` into the
    dir `out` (required)."""

    format: str | None = None
    """saelens | circuit_tracer | hf_model (SmolLM2 as a Hugging Face folder, no checkpoint)."""
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


@dataclass
class AttributeConfig(CommandConfig):
    """`python -m nn_decomp.attribute` (conf/attribute.yaml): attribution graphs of every prompt in
    `prompts` through the set `checkpoint` / `checkpoints` (covering every MLP), written into `out`
    (required; `overwrite` redoes prompts already there). The defaults are CPU-sane (README: Circuits)."""

    prompts: str | None = None
    """A text file, one prompt per line (# starts a comment)."""
    hf_model: str | None = None
    """The Hugging Face folder circuit-tracer runs (nnsight backend); default: SmolLM2 written once
    into the cache dir, other models by their Hub name (TransformerLens backend)."""
    scan: str | None = None
    """circuit-tracer's name for the feature set (default: out's name)."""
    batch_size: int = 64
    """Source nodes per backward pass: circuit-tracer runs the forward on this many copies of the prompt."""
    max_feature_nodes: int | None = 4096
    """Feature nodes kept in the graph (the most influential; null: all active features)."""
    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    completeness: float = 0.7
    """The pruned graph's size is also reported at the smallest graph reaching this completeness."""
    dashboard: str | None = None
    """Feature nodes of the graph pages link here (`{layer}` is filled in for a per-layer set)."""
    device: str = "auto"
    paths: Any = None

    def __post_init__(self):
        require(self.batch_size > 0, f"batch_size={self.batch_size}: must be > 0")
        for name in ("node_threshold", "edge_threshold", "completeness", "desired_logit_prob"):
            value = getattr(self, name)
            require(0 < value <= 1, f"{name}={value}: must lie in (0, 1]")


SAEBENCH_EVALS = ("core", "absorption", "sparse_probing", "autointerp")


@dataclass
class SaebenchConfig(CommandConfig):
    """`python -m nn_decomp.saebench` (conf/saebench.yaml): SAEBench's evals on `checkpoint` (or each of
    `checkpoints`, scored independently), run by sae-bench in its own Python. Results go into each
    checkpoint dir: `saebench/<eval>/` (SAEBench's JSON) and `saebench.json` (one flat row, which
    `collect` reads); an eval already in saebench.json is skipped unless `overwrite`. `out` is unused."""

    evals: list[str] = field(default_factory=lambda: list(SAEBENCH_EVALS))
    """Any of core, absorption, sparse_probing, autointerp."""
    device: str = "auto"
    cache_dir: str = "${paths.cache_dir}"
    paths: Any = None
    llm_batch_size: int = 16
    """Contexts (or prompts) per LM forward in every eval."""
    core_tokens: int = 16384
    """core: held-out tokens (whole contexts of the checkpoint's data.context_size) for CE / KL / EV."""
    probing_sets: list[str] = field(default_factory=lambda: ["sotu_party", "sotu_era", "sotu_president"])
    """sparse_probing: built-in SOTU sets (data/probing.py) or JSONL files (text, label, group)."""
    probe_train_per_class: int = 100
    probe_test_per_class: int = 30
    probe_test_fraction: float = 0.25
    """Fraction of each label's groups (speeches) held out for the probes' test texts."""
    probe_context_length: int = 128
    autointerp_latents: int = 100
    """autointerp: latents scored (SAEBench's default 1000 costs 2000 judge calls)."""
    autointerp_tokens: int = 131072
    """autointerp: held-out tokens scanned for each latent's examples (SAEBench's default: 2M)."""
    judge: str = "offline"
    """autointerp's judge: offline (the worker's token-matching stand-in, no network) | openai."""
    judge_url: str = "https://api.openai.com/v1"
    judge_model: str = "gpt-4o-mini"
    judge_api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (never the key itself)."""
    seed: int = 42

    def __post_init__(self):
        unknown = sorted(set(self.evals) - set(SAEBENCH_EVALS))
        require(self.evals and not unknown, f"evals={list(self.evals)}: choose from {list(SAEBENCH_EVALS)}")
        require(self.judge in ("offline", "openai"), f"judge={self.judge!r}: use offline or openai")
        require(min(self.llm_batch_size, self.core_tokens, self.probe_train_per_class, self.probe_test_per_class,
                    self.probe_context_length, self.autointerp_latents, self.autointerp_tokens) > 0,
                "llm_batch_size, core_tokens, probe_*_per_class, probe_context_length and autointerp_* must be > 0")
        require(0 < self.probe_test_fraction < 1, f"probe_test_fraction={self.probe_test_fraction}: must lie in (0, 1)")
