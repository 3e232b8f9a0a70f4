"""`python -m nn_decomp.export checkpoint=PATH format=saelens|circuit_tracer out=DIR`: write a
dictionary in another library's on-disk format (nn_decomp.interop.saelens and .circuit_tracer
describe them); `from_saelens=DIR out=DIR` reads a SAELens SAE back as our checkpoint, so
`nn_decomp.evaluate` can score it.

`format=hf_model out=DIR [first_n_layers=N]` writes SmolLM2 as a Hugging Face model folder, the
model circuit-tracer runs (README: "Attribution graphs with circuit-tracer").
"""
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

import nn_decomp.config  # noqa: F401  (registers base_export)
from nn_decomp.config import UsageError, check_command
from nn_decomp.config.arch import CHECKPOINT_ONLY
from nn_decomp.dictionaries import checkpoint_list, load_dictionaries
from nn_decomp.interop.circuit_tracer import circuit_tracer_files
from nn_decomp.interop.formats import write_dir, write_hf_dir
from nn_decomp.interop.saelens import import_saelens, saelens_files
from nn_decomp.runtime.checkpoint import read_config
from nn_decomp.runtime.files import refuse_existing
from nn_decomp.runtime.jobs import exit_on_usage_error

FORMATS = ("saelens", "circuit_tracer", "hf_model")


def export(cfg: DictConfig) -> Path:
    """Export (or, with from_saelens, import) as `cfg` says; returns the written dir."""
    check_command(cfg)
    if not cfg.out:
        raise UsageError("pass out=DIR for the exported files")
    if cfg.get("from_saelens"):
        return import_saelens(cfg.from_saelens, cfg.out, cfg.overwrite, cfg.get("model_name"))
    if cfg.format not in FORMATS:
        raise UsageError(f"format={cfg.format}: choose one of {FORMATS}")
    refuse_existing([Path(cfg.out)], cfg.overwrite)
    if cfg.format == "hf_model":
        return write_hf_dir(Path(cfg.out), cfg.first_n_layers)
    dictionaries = load_dictionaries(checkpoint_list(cfg))
    metas = [read_config(d.path)[1] for d in dictionaries]
    for meta, d in zip(metas, dictionaries):
        if meta["arch"] in CHECKPOINT_ONLY:
            raise UsageError(f"{cfg.format} has no {meta['arch']}: its format is our checkpoint ({d.path}: "
                             "config.yaml + safetensors, read by nn_decomp.runtime.checkpoint.load_dictionary)")
    with torch.no_grad():
        if cfg.format == "saelens":
            if len(dictionaries) > 1:
                raise UsageError("SAELens holds one SAE per directory: export each checkpoint on its own")
            files = saelens_files(dictionaries[0], metas[0], read_config(dictionaries[0].path)[0])
        else:
            files = circuit_tracer_files(dictionaries, metas, cfg.hf_model, cfg.model_name,
                                         cfg.scan or Path(cfg.out).name)
        return write_dir(Path(cfg.out), files, cfg.overwrite)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    print(f"wrote {exit_on_usage_error(export, cfg)}")


if __name__ == "__main__":
    main()
