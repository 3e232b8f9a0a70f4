"""The experiments' own sections, read by experiments/*/run.py and merged with OmegaConf.structured
(not stored in ConfigStore): `analysis:` of conf/scale/*.yaml and `interp:` of exp_004."""
from dataclasses import dataclass

from nn_decomp.config.errors import require


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
