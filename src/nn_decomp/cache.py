"""Activation caches: run the LM once, train many dictionaries from the stored activations.

    python -m nn_decomp.cache model=… data=… arch=… cache.n_tokens=… [cache.path=…] [cache.dtype=…]
    python -m nn_decomp.train data=cache model=… arch=… [data.path=…] --multirun act.k=8,16,32,64

The file format and its writer are data/cache_file.py; training reads it through data/cached.py.
"""
import hydra
from omegaconf import DictConfig

from nn_decomp.data.cache_file import build_cache
from nn_decomp.runtime.jobs import exit_on_usage_error


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    meta = exit_on_usage_error(build_cache, cfg)
    print(f"wrote {meta.n_tokens} train + {meta.n_eval} eval rows of {meta.hooks} ({meta.dtype}) to {meta.path}\n"
          f"train from it: python -m nn_decomp.train data=cache data.path={meta.path} "
          f"model.name={meta.model} arch=… (the same arch overrides)")


if __name__ == "__main__":
    main()
