"""`act:` (conf/act/): one schema per activation module of core/activations.py, which each
`_target_` names; the penalties JumpReLU offers."""
from dataclasses import dataclass

from nn_decomp.config.errors import require


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
