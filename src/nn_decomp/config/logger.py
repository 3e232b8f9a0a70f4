"""`logger:` (conf/logger/): where training metrics go (runtime/logger.py)."""
from dataclasses import dataclass

from nn_decomp.config.errors import require


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
