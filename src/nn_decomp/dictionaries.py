"""Trained dictionaries loaded with where they sit in the model: what every command that uses a
dictionary (evaluate, convert, export, interp, and the coming attribution and SAEBench bridges)
loads, and the checks a set of them must pass before any LM is loaded or run.

A `HookedDictionary` is a `SparseCoder` (its own encode / decode: core/coder.py) plus the hooks it
reads and writes. Several of them (per-layer transcoders) form one replacement model when they come
from one model and write distinct hooks (`load_dictionaries`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from nn_decomp.config import UsageError
from nn_decomp.core.coder import SparseCoder
from nn_decomp.data.hooks import check_hooks, hook_layer
from nn_decomp.runtime.checkpoint import load_dictionary, read_config

if TYPE_CHECKING:  # transformer_lens takes seconds to import; loading and the checks before the LM never need it
    from transformer_lens import HookedTransformer


@dataclass
class HookedDictionary:
    """A coder and where it sits in the model: it reads `hooks_in[i]` and writes `hooks_out[i]` for
    each covered model layer `layers[i]` (one entry unless a CLT or a crosscoder)."""

    coder: SparseCoder
    hooks_in: list[str]
    hooks_out: list[str]
    layers: list[int]
    model_name: str
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> HookedDictionary:
        _, meta = read_config(path)
        return cls(load_dictionary(path, device), list(meta["hooks_in"]), list(meta["hooks_out"]),
                   list(meta["layers"]), meta["model"], Path(path))


def checkpoint_list(cfg: DictConfig) -> list[Path]:
    """A command's `checkpoint=PATH` and / or `checkpoints=[PATH,...]`, at least one."""
    paths = ([cfg.checkpoint] if cfg.checkpoint else []) + list(cfg.get("checkpoints") or [])
    if not paths:
        raise UsageError("no checkpoint given: pass checkpoint=PATH (or checkpoints=[PATH,...] for a transcoder set)")
    return [Path(p) for p in paths]


def load_dictionaries(paths: list[Path], device: str | torch.device = "cpu") -> list[HookedDictionary]:
    """Load every checkpoint, sorted by first layer; all must come from one model and write
    distinct hooks."""
    dictionaries = []
    for path in paths:
        try:
            dictionaries.append(HookedDictionary.load(path, device))
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
    models = {d.model_name for d in dictionaries}
    if len(models) > 1:
        raise UsageError(f"checkpoints come from different models {sorted(models)}; pass checkpoints of one model")
    if len(dictionaries) > 1 and any(d.coder.n_layers > 1 for d in dictionaries):
        raise UsageError("a CLT or crosscoder already covers several layers: pass it alone as checkpoint=PATH")
    try:
        check_disjoint_outputs(dictionaries)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return sorted(dictionaries, key=lambda d: d.layers[0])


def check_disjoint_outputs(dictionaries: Sequence[HookedDictionary]) -> None:
    seen: dict[str, Path | None] = {}
    for d in dictionaries:
        for hook in d.hooks_out:
            if hook in seen:
                raise ValueError(f"{hook} is written by two dictionaries ({seen[hook]} and {d.path}); "
                                 "pass one dictionary per layer")
            seen[hook] = d.path


def check_model_choice(cfg: DictConfig, dictionaries: list[HookedDictionary]) -> str:
    """The model to load: the checkpoints'; a `model=` choice must agree with it."""
    trained_on = dictionaries[0].model_name
    chosen = cfg.model.name if cfg.get("model") else None
    if chosen is not None and chosen != trained_on:
        raise UsageError(f"{dictionaries[0].path} was trained on model {trained_on!r}, not {chosen!r}: "
                         f"drop model= (or pass model={trained_on}) or pass a checkpoint trained on {chosen!r}")
    return trained_on


@torch.no_grad()
def check_compatible(model: HookedTransformer, dictionaries: list[HookedDictionary]) -> None:
    """Every hook exists in `model` and has the width the dictionary was trained on."""
    hooks = sorted({h for d in dictionaries for h in d.hooks_in + d.hooks_out})
    try:
        check_hooks(model, hooks)
    except UsageError as e:
        raise UsageError(f"{e}: the checkpoint was trained on another model; evaluate it with that one") from None
    stop = max(hook_layer(h) for h in hooks) + 1
    _, cache = model.run_with_cache(torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device),
                                    names_filter=hooks, stop_at_layer=stop)
    for d in dictionaries:
        for hooks_d, width in ((d.hooks_in, d.coder.d_in), (d.hooks_out, d.coder.d_out)):
            for h in hooks_d:
                if cache[h].shape[-1] != width:
                    raise UsageError(f"{d.path} expects width {width} at {h} but {model.cfg.model_name} has "
                                     f"{cache[h].shape[-1]}: it was trained on another model")
