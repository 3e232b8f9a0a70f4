"""Run a TransformerLens model with dictionaries patched into its forward pass.

`patched(model, dictionaries, mode)` is a context manager over `model.hooks(fwd_hooks=...)`:

- "splice": every covered hook_out is replaced by the dictionary's reconstruction, computed from the
  hook_in activation of the *same* forward pass. Splicing all layers of a CLT, or a list of per-layer
  transcoders, is the replacement model: layer j's features are encoded from the residual stream as
  the earlier replacements left it (not teacher-forced from a clean run), and a CLT sums the writes
  of every source layer i ≤ j through its cross-layer decoders. `layers=` splices only some targets
  (a CLT's output at j still reads its features at every i ≤ j).
  A crosscoder reads every covered layer, later ones too, so no single pass can encode it as it
  runs: its splice writes the reconstruction encoded from a clean pass's activations (`clean=`,
  e.g. run_with_cache's cache of the same tokens), the usual way to evaluate one.
  A MOLT's write applies its active transforms to the same pass's hook_in activation.
- "zero" / "mean": hook_out is replaced by zeros / by a fixed mean vector (the ablation baselines).

Hook functions come from `functools.partial` over module-level functions, so each binds its own
layer and dictionary when it is built (no late-binding closures in loops).
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nn_decomp.core.coder import SparseCoder
from nn_decomp.dictionaries import HookedDictionary, check_disjoint_outputs

if TYPE_CHECKING:  # transformer_lens takes seconds to import; export and CLI errors never need it
    from transformer_lens import HookedTransformer

MODES = ("splice", "zero", "mean")


# --- hook functions (bound with functools.partial) -------------------------------------------

def _read_input(act_BTD: Tensor, hook, *, cache: dict, key: tuple, coder: SparseCoder, i: int) -> None:
    x_ND = act_BTD.reshape(-1, act_BTD.shape[-1]).to(coder.W_enc.dtype)
    cache[key] = (x_ND, coder.encode_layer(x_ND, i))


def _write_output(act_BTD: Tensor, hook, *, cache: dict, d_idx: int, coder: SparseCoder, j: int,
                  decoders: dict[int, Tensor], positions_BT: Tensor | None, clear: bool) -> Tensor:
    sources = coder.sources(j)
    missing = [i for i in sources if (d_idx, i) not in cache]
    if missing:
        raise RuntimeError(f"{hook.name}: the dictionary's input for source index {missing} did not run "
                           "before its output hook; hook_in must come before hook_out in the forward pass")
    latents = {i: cache[(d_idx, i)][1] for i in sources}
    recon_ND = coder.decode_layer(latents, cache[(d_idx, j)][0], j, decoders)
    if clear:  # the last target of this dictionary: its inputs are not needed again this pass
        for key in [k for k in cache if k[0] == d_idx]:
            del cache[key]
    recon_BTD = recon_ND.view(act_BTD.shape).to(act_BTD.dtype)
    return _where(positions_BT, recon_BTD, act_BTD)


def _replace(act_BTD: Tensor, hook, *, value: Tensor, positions_BT: Tensor | None) -> Tensor:
    """act replaced by `value` ([D] or [B, T, D]) at the patched positions."""
    return _where(positions_BT, value.to(act_BTD).expand_as(act_BTD), act_BTD)


def _where(positions_BT: Tensor | None, patched_BTD: Tensor, clean_BTD: Tensor) -> Tensor:
    if positions_BT is None:
        return patched_BTD
    return torch.where(positions_BT[..., None].to(clean_BTD.device), patched_BTD, clean_BTD)


# --- the context manager ---------------------------------------------------------------------

def crosscoder_hooks(d: HookedDictionary, targets: list[int], clean: dict[str, Tensor] | None,
                     positions_BT: Tensor | None) -> list[tuple[str, object]]:
    """A crosscoder's writes to `targets`: its reconstruction of the `clean` activations."""
    if clean is None:
        raise ValueError("a crosscoder reads every covered layer, later ones too: its splice encodes a clean "
                         "pass's activations; pass clean={hook: activation} (run_with_cache's cache of the tokens)")
    x_BTLD = torch.stack([clean[h] for h in d.hooks_in], 2).to(d.coder.W_enc.dtype)
    recon_BTLD = d.coder(x_BTLD.flatten(0, 1)).recon.view(*x_BTLD.shape[:3], -1)
    return [(d.hooks_out[j], partial(_replace, value=recon_BTLD[:, :, j], positions_BT=positions_BT)) for j in targets]


def splice_hooks(dictionaries: Sequence[HookedDictionary], layers: Sequence[int] | None = None,
                 positions_BT: Tensor | None = None, clean: dict[str, Tensor] | None = None) -> list[tuple[str, object]]:
    """fwd_hooks that replace each covered hook_out (model layers in `layers`, default all) by its
    reconstruction, encoded from the hook_in activations of the same forward pass (a crosscoder's:
    of `clean`)."""
    cache: dict = {}
    ranked = []  # (rank, hook name, fn): on one hook point, own reads < writes < other reads
    for d_idx, d in enumerate(dictionaries):
        targets = [j for j, layer in enumerate(d.layers) if layers is None or layer in layers]
        if d.coder.crosscoder:
            ranked += [(1, name, fn) for name, fn in crosscoder_hooks(d, targets, clean, positions_BT)]
            continue
        needed = sorted({i for j in targets for i in d.coder.sources(j)})
        written = {d.hooks_out[j] for j in targets}
        for i in needed:
            # An SAE reads its hook point before replacing it; a dictionary reading another's
            # output reads it after the replacement, as the replacement model would.
            rank = 0 if d.hooks_in[i] in written else 2
            ranked.append((rank, d.hooks_in[i], partial(_read_input, cache=cache, key=(d_idx, i),
                                                        coder=d.coder, i=i)))
        for j in targets:
            ranked.append((1, d.hooks_out[j], partial(
                _write_output, cache=cache, d_idx=d_idx, coder=d.coder, j=j, decoders=d.coder.layer_decoders(j),
                positions_BT=positions_BT, clear=j == targets[-1])))
    return [(name, fn) for _, name, fn in sorted(ranked, key=lambda r: r[0])]


def ablation_hooks(hooks_out: Sequence[str], mode: str, means: dict[str, Tensor] | None = None,
                   positions_BT: Tensor | None = None) -> list[tuple[str, object]]:
    """fwd_hooks that replace each hook in `hooks_out` by zeros ("zero") or by means[hook] ("mean")."""
    hooks = []
    for name in hooks_out:
        if mode == "mean":
            if means is None or name not in means:
                raise ValueError(f"mode='mean' needs means[{name!r}]: pass means=mean_activations(...)")
            value_D = means[name]
        else:
            value_D = torch.zeros(())
        hooks.append((name, partial(_replace, value=value_D, positions_BT=positions_BT)))
    return hooks


@contextmanager
def patched(model: HookedTransformer, dictionaries: HookedDictionary | Sequence[HookedDictionary],
            mode: str = "splice", layers: Sequence[int] | None = None,
            means: dict[str, Tensor] | None = None, positions_BT: Tensor | None = None,
            clean: dict[str, Tensor] | None = None):
    """Within the block, every forward of `model` runs with the dictionaries patched in.

    mode: "splice" (reconstructions), "zero" or "mean" (ablate the same hook_out points; "mean" needs
    `means`, {hook name: [D] mean activation}). layers: model layers whose output is patched
    (default every covered layer). positions_BT: bool [batch, pos] mask of the positions to patch
    (the others keep the clean activation), e.g. to leave BOS alone; None patches all. clean: {hook:
    activation} of a clean pass of the same tokens, which a crosscoder's splice encodes.
    """
    assert mode in MODES, f"mode={mode!r}: choose one of {MODES}"
    if isinstance(dictionaries, HookedDictionary):
        dictionaries = [dictionaries]
    check_disjoint_outputs(dictionaries)
    if mode == "splice":
        hooks = splice_hooks(dictionaries, layers, positions_BT, clean)
    else:
        outs = [h for d in dictionaries for h, layer in zip(d.hooks_out, d.layers)
                if layers is None or layer in layers]
        hooks = ablation_hooks(outs, mode, means, positions_BT)
    with model.hooks(fwd_hooks=hooks):
        yield model


def replacement_model(model: HookedTransformer, dictionaries: HookedDictionary | Sequence[HookedDictionary],
                      positions_BT: Tensor | None = None):
    """Every covered MLP (hook_out) replaced at once: `patched(..., "splice")` over all layers."""
    return patched(model, dictionaries, "splice", positions_BT=positions_BT)
