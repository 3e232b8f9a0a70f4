"""`python -m nn_decomp.convert checkpoint=PATH to=jumprelu [out=DIR] [calibrate=true]`: turn a
TopK / BatchTopK dictionary into a JumpReLU one (what circuit-tracer and SAELens transcoders run);
`checkpoints=[PATH,...]` converts a set (a transcoder per layer) from one pass of the LM.
The estimators and the report: nn_decomp/analysis/conversion.py.
"""
import hydra
from omegaconf import DictConfig

import nn_decomp.config  # noqa: F401  (registers base_convert)
from nn_decomp.analysis.conversion import convert
from nn_decomp.runtime.jobs import exit_on_usage_error


@hydra.main(version_base="1.3", config_path="../../conf", config_name="convert")
def main(cfg: DictConfig) -> None:
    exit_on_usage_error(convert, cfg)


if __name__ == "__main__":
    main()
