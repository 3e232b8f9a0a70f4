"""Metrics sinks: always a JSONL file in the run dir; wandb too when `logger=wandb`."""
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class MetricsLogger:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.file = open(Path(run_dir) / "metrics.jsonl", "a")
        self.wandb_run = None
        if cfg.logger.name == "wandb":
            import wandb  # imported here: it is slow to import and most runs do not use it

            self.wandb_run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode,
                                        dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, split: str, metrics: dict, step: int) -> None:
        self.file.write(json.dumps({"split": split, "step": step, **metrics}) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def finish(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
