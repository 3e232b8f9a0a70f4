"""Checkpoints that load without Hydra: `dictionary.safetensors` (normalisation folded in),
`config.yaml` (the resolved run config), `metadata.json`, and `trainer_state.pt` for resume.

A checkpoint directory is replaced whole (runtime/files.py `replacing_dir`): written and synced to a
temporary sibling, then swapped in by rename. A crash at any point leaves a complete checkpoint that
`recover_dir` puts back in place: the previous one, or the new one once it was fully written.
"""
import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from nn_decomp.core.coder import SparseCoder
from nn_decomp.config.arch import AUTOENCODERS, TRANSCODERS, molt_groups
from nn_decomp.runtime.files import replacing_dir

WEIGHTS, CONFIG, METADATA, TRAINER_STATE = "dictionary.safetensors", "config.yaml", "metadata.json", "trainer_state.pt"


def build_coder(cfg: DictConfig, d_in: int, d_out: int) -> SparseCoder:
    """The one place a config becomes a SparseCoder: arch picks the switches, act the module."""
    act = instantiate(cfg.act)
    arch = cfg.arch
    get = arch.get  # checkpoints older than a key lack it: its default
    act.unit_norm_decoder = unit_norm_decoder(arch, act.unit_norm_decoder)
    if act.token_norm is None:  # JumpReLU's null (config/act.py): a checkpoint older than the key has False
        act.token_norm = arch.name in AUTOENCODERS
    return SparseCoder(d_in, d_out, arch.n_latents, len(arch.layers), act,
                       cross_layer=arch.name == "clt", crosscoder=arch.name == "crosscoder",
                       transforms=tuple(molt_groups(arch.n_latents, list(arch.molt_ranks))) if arch.name == "molt" else (),
                       decoder_norm=get("decoder_norm", "concat"), skip=get("skip", arch.name == "skip_transcoder"),
                       dec_init_norm=arch.dec_init_norm, tied_init=arch.name == "sae",
                       matryoshka=tuple(get("matryoshka", ())), decoder_tying=get("decoder_tying", "none"),
                       per_target_scale=get("per_target_scale", False), feature_offset=get("feature_offset", False),
                       feature_scale=get("feature_scale", False))


def unit_norm_decoder(arch: DictConfig, activation_wants: bool) -> bool:
    """arch.unit_norm_decoder resolved (config/arch.py: the rule). A checkpoint older than the key keeps the
    activation's choice, which is what it was trained with."""
    if "unit_norm_decoder" not in arch:
        return activation_wants
    if arch.unit_norm_decoder is None:
        return activation_wants and arch.name not in TRANSCODERS
    return arch.unit_norm_decoder


def save_checkpoint(path: Path, coder: SparseCoder, cfg: DictConfig, metadata: dict,
                    trainer_state: dict | None = None) -> None:
    tensors = {name: t.detach().contiguous().cpu() for name, t in coder.state_dict().items()}
    with replacing_dir(path) as tmp:
        save_file(tensors, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(OmegaConf.to_yaml(cfg))
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)


OLD_ACTIVATIONS = "nn_decomp.activations."  # where checkpoints saved before the regroup name their activation


def read_config(path: Path) -> tuple[DictConfig, dict]:
    path = Path(path)
    if not (path / WEIGHTS).exists():
        raise FileNotFoundError(
            f"{path} is not a checkpoint (no {WEIGHTS}); pass a run's checkpoint dir, e.g. outputs/runs/.../checkpoint")
    cfg = OmegaConf.load(path / CONFIG)
    target = OmegaConf.select(cfg, "act._target_", default="")
    if target.startswith(OLD_ACTIVATIONS):
        cfg.act._target_ = "nn_decomp.core.activations." + target.removeprefix(OLD_ACTIVATIONS)
    return cfg, json.loads((path / METADATA).read_text())


def load_dictionary(path: str | Path, device: str | torch.device = "cpu") -> SparseCoder:
    """Rebuild the trained coder from its checkpoint directory alone. It maps raw activations at
    `metadata['hooks_in']` to raw activations at `metadata['hooks_out']`."""
    cfg, meta = read_config(path)
    coder = build_coder(cfg, meta["d_in"], meta["d_out"])
    state = load_file(Path(path) / WEIGHTS, device=str(device))
    expected = {k: tuple(v.shape) for k, v in coder.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        raise ValueError(f"{path}: weights do not match its config.yaml (expected {expected}, found {found}); "
                         "the checkpoint was edited or written by another version")
    coder.load_state_dict(state)
    return coder.to(device).eval()
