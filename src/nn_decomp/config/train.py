"""`train:` (conf/train/): the optimisation (train.py), and the `train.resume` choices that
runtime/jobs.py checks too."""
from dataclasses import dataclass
from typing import Any

from nn_decomp.config.errors import require

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
    warmup_steps: int = 10
    decay_fraction: float = 0.1
    """The lr decays to 0 over this last fraction of steps. With warmup_steps, chosen for the default
    run's own budget (292 steps): 50 / 0.2 held the lr below its peak for 37 % of them (held-out FVU
    0.044 → 0.039 / 0.041 over two seeds), equal at 2M tokens (README: the default run). The scale
    presets keep the 50 / 0.2 (20 / 0.2) their experiments' figures were made with."""
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
    keep_last: int = 2
    """Complete checkpoints kept: 2 keeps the one before the newest (`checkpoint.prev/`), which resume
    falls back to when the newest is damaged; 1 keeps only the newest."""
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
        require(self.keep_last in (1, 2), f"train.keep_last={self.keep_last}: use 1 or 2")
        require(min(self.log_every, self.eval_every, self.checkpoint_every, self.eval_tokens, self.dead_tokens) > 0,
                "train.log_every, eval_every, checkpoint_every, eval_tokens and dead_tokens must be positive")
        require(self.warmup_steps >= 0 and self.sparsity_warmup_steps >= 0 and self.grad_clip > 0,
                "train.warmup_steps and train.sparsity_warmup_steps must be >= 0, train.grad_clip > 0")
        check_resume(self.resume)
        require(self.tensor_parallel >= 1, f"train.tensor_parallel={self.tensor_parallel}: must be >= 1")
        require(self.tensor_parallel == 1 or self.dtype != "float16",
                "train.dtype=float16 with train.tensor_parallel > 1: the loss scaler's skip decision is per "
                "shard; use train.dtype=bfloat16")
