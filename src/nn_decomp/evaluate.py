"""`python -m nn_decomp.evaluate checkpoint=PATH`: evaluate a dictionary on held-out text.

Writes `eval.json` and `feature_density.png` into the checkpoint dir (or `out=DIR`) and prints a
table. For a set of per-layer transcoders pass `checkpoints=[A,B,...]` and `out=DIR`. The metrics
and their definitions: nn_decomp/analysis/evaluation.py.
"""
import hydra
from omegaconf import DictConfig

import nn_decomp.config  # noqa: F401  (registers base_evaluate and the model schemas `model=<option>` composes)
from nn_decomp.analysis.evaluation import evaluate
from nn_decomp.runtime.jobs import exit_on_usage_error


@hydra.main(version_base="1.3", config_path="../../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    exit_on_usage_error(evaluate, cfg)


if __name__ == "__main__":
    main()
