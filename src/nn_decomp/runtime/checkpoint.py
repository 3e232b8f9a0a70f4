"""Checkpoints that load without Hydra: `dictionary.safetensors` (normalisation folded in),
`config.yaml` (the resolved run config), `metadata.json`, `trainer_state.pt` for resume, and
`checksums.json` (each file's length and sha256).

A checkpoint directory is replaced whole (runtime/files.py `replacing_dir`): written and synced to a
temporary sibling, then swapped in by rename. A crash at any point leaves a complete checkpoint that
`recover_dir` puts back in place: the previous one, or the new one once it was fully written. With
train.keep_last=2 the one before stays as `checkpoint.prev/`. Every reader verifies the files it reads
against checksums.json (`verify`) and refuses non-finite weights, so a damaged checkpoint ends in one
line naming the file (resume falls back to checkpoint.prev: runtime/resume.py). Hashing costs about
a second per GB written or read; checkpoints written before checksums.json load unverified.
"""
import errno
import hashlib
import json
import math
import shutil
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nn_decomp.core.coder import SparseCoder
from nn_decomp.config import UsageError
from nn_decomp.config.arch import AUTOENCODERS, TRANSCODERS, molt_groups
from nn_decomp.runtime.files import replacing_dir

WEIGHTS, CONFIG, METADATA, TRAINER_STATE = "dictionary.safetensors", "config.yaml", "metadata.json", "trainer_state.pt"
CHECKSUMS = "checksums.json"
CHECKPOINT_FILES = (WEIGHTS, CONFIG, METADATA, TRAINER_STATE)


class DamagedCheckpoint(UsageError):
    """A checkpoint file that is missing, truncated, changed since written, or holds non-finite values."""


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
                    trainer_state: dict | None = None, keep_last: int = 1) -> None:
    """Write the checkpoint dir `path` whole (keep_last=2: the one it replaces becomes path.prev).
    A full disk ends in one line naming the path and the space asked, the partial files removed."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in coder.state_dict().items()}
    try:
        with replacing_dir(path, keep_previous=keep_last > 1) as tmp:
            save_file(tensors, tmp / WEIGHTS)
            (tmp / CONFIG).write_text(OmegaConf.to_yaml(cfg))
            (tmp / METADATA).write_text(json.dumps(metadata, indent=2))
            if trainer_state is not None:
                torch.save(trainer_state, tmp / TRAINER_STATE)
            (tmp / CHECKSUMS).write_text(json.dumps({f.name: digest(f) for f in sorted(tmp.iterdir())}, indent=1))
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        need = sum(t.numel() * t.element_size() for t in tensors.values()) * (4 if trainer_state else 1)
        free = shutil.disk_usage(path.parent).free
        raise UsageError(f"disk full writing the checkpoint {path}: it needs about {need / 2**20:,.0f} MiB and "
                         f"{free / 2**20:,.0f} MiB are free on that disk; free space (or move the run dir) and "
                         "resume with train.resume=auto (the previous checkpoint is intact)") from None


def digest(file: Path) -> dict:
    with open(file, "rb") as f:
        return {"bytes": file.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def verify(path: Path, names: tuple[str, ...]) -> None:
    """Check the files `names` of checkpoint `path` against its checksums.json (one written before it
    existed is not checked)."""
    path = Path(path)
    if not (path / CHECKSUMS).exists():
        return
    try:
        expected = json.loads((path / CHECKSUMS).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DamagedCheckpoint(f"{path / CHECKSUMS} is damaged (not JSON)") from None
    for name in names:
        file = path / name
        if name not in expected:
            continue  # a file the checkpoint was written without (no trainer state)
        if not file.exists():
            raise DamagedCheckpoint(f"{file} is missing")
        found = digest(file)
        if found["bytes"] != expected[name]["bytes"]:
            raise DamagedCheckpoint(f"{file} is damaged: {found['bytes']:,} bytes, {expected[name]['bytes']:,} written")
        if found["sha256"] != expected[name]["sha256"]:
            raise DamagedCheckpoint(f"{file} is damaged: its contents changed since it was written (sha256 differs)")


def check_finite(tensors: dict, where: Path) -> None:
    """Refuse NaN / Inf in loaded weights or optimizer state (nested dicts and lists of tensors)."""
    for name, value in tensors.items():
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
        if items is not None:
            check_finite(dict(items), where)
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise DamagedCheckpoint(f"{where} holds non-finite values in {name}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise DamagedCheckpoint(f"{where} holds a non-finite {name}")


def load_trainer_state(path: Path, **kwargs) -> dict:
    """The trainer state of checkpoint `path` (verified by the caller; torch.load's kwargs), refused
    if it holds NaN / Inf."""
    state = torch.load(Path(path) / TRAINER_STATE, weights_only=False, **kwargs)
    check_finite({"coder": state["coder"], "optimizer": state["optimizer"]["state"]}, Path(path) / TRAINER_STATE)
    return state


OLD_ACTIVATIONS = "nn_decomp.activations."  # where checkpoints saved before the regroup name their activation


def read_config(path: Path) -> tuple[DictConfig, dict]:
    path = Path(path)
    if not (path / WEIGHTS).exists():
        raise FileNotFoundError(
            f"{path} is not a checkpoint (no {WEIGHTS}); pass a run's checkpoint dir, e.g. outputs/runs/.../checkpoint")
    verify(path, (CONFIG, METADATA))
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
    verify(path, (WEIGHTS,))
    try:
        state = load_file(Path(path) / WEIGHTS, device=str(device))
    except SafetensorError as e:  # a checkpoint without checksums.json
        raise DamagedCheckpoint(f"{Path(path) / WEIGHTS} is damaged: {e}") from None
    expected = {k: tuple(v.shape) for k, v in coder.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        raise DamagedCheckpoint(f"{path}: weights do not match its config.yaml (expected {expected}, found {found}); "
                                "the checkpoint was edited or written by another version")
    check_finite(state, Path(path) / WEIGHTS)
    coder.load_state_dict(state)
    return coder.to(device).eval()
