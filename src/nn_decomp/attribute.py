"""`python -m nn_decomp.attribute checkpoint=CLT|checkpoints=[L0,...,LN] prompts=FILE out=DIR`: an
attribution graph per prompt through a dictionary set covering every MLP, scored: circuit-tracer's
graph, frontend JSON and scores, pruned sizes and scores, the replacement model's KL / CE, an
offline page per graph, and a summary over the prompts (nn_decomp/interop/attribution.py). Runs
circuit-tracer in its own Python: `bash setup_env.sh --with circuit-tracer` creates it.
"""
import json

import hydra
from omegaconf import DictConfig

import nn_decomp.config  # noqa: F401  (registers base_attribute)
from nn_decomp.interop.attribution import attribute
from nn_decomp.runtime.jobs import exit_on_usage_error


@hydra.main(version_base="1.3", config_path="../../conf", config_name="attribute")
def main(cfg: DictConfig) -> None:
    summary = exit_on_usage_error(attribute, cfg)
    print(json.dumps({key: value["mean"] for key, value in summary["scores"].items()}, indent=1))
    print(f"wrote {cfg.out}/summary.json, summary.csv and a graph, page and scores per prompt")


if __name__ == "__main__":
    main()
