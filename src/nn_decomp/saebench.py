"""`python -m nn_decomp.saebench checkpoint=PATH [evals=[core,absorption,sparse_probing,autointerp]]`:
SAEBench's evals on a trained dictionary (or each of `checkpoints=[...]`), offline, run by sae-bench
0.6.0 in its own Python (`bash setup_env.sh --with sae-bench` creates it). Writes SAEBench's result
JSON per eval into <checkpoint>/saebench/ and a flat row, <checkpoint>/saebench.json, that
`python -m nn_decomp.collect` adds to the sweep table (nn_decomp/interop/saebench.py: data, and what
each eval means for a transcoder, and for a CLT, scored layer by layer).
"""
import re

import hydra
from omegaconf import DictConfig

import nn_decomp.config  # noqa: F401  (registers base_saebench)
from nn_decomp.interop.saebench import saebench
from nn_decomp.runtime.jobs import exit_on_usage_error

HEADLINE = ["core.model_performance_preservation.ce_loss_score", "core.reconstruction_quality.explained_variance",
            "core.sparsity.l0", "absorption.mean.mean_absorption_fraction_score", "sparse_probing.sae.sae_top_1_test_accuracy",
            "sparse_probing.llm.llm_test_accuracy", "autointerp.autointerp.autointerp_score"]


@hydra.main(version_base="1.3", config_path="../../conf", config_name="saebench")
def main(cfg: DictConfig) -> None:
    rows = exit_on_usage_error(saebench, cfg)
    for path, row in rows.items():
        print(f"{path}/saebench.json")
        for key, value in row.items():
            if re.sub(r"\.layer\d+\.", ".", key) in HEADLINE:  # a CLT's, per layer
                print(f"  {key:55s} {value:.4f}")


if __name__ == "__main__":
    main()
