"""TransformerLens hook names: which block a hook lives in, and whether a model has it. Kept apart
from store.py so that checking a dictionary's hooks imports no LM stack."""
from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING

from nn_decomp.config import UsageError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def check_hooks(model: HookedTransformer, hooks: list[str]) -> None:
    """Fail on a misspelt hook name before any compute is spent."""
    for hook in hooks:
        if hook not in model.hook_dict:
            close = difflib.get_close_matches(hook, list(model.hook_dict), n=5)
            raise UsageError(f"hook {hook!r} not in {model.cfg.model_name}; close matches: {close}")


def hook_layer(hook: str) -> int:
    """Block a hook lives in: "blocks.7.ln2.hook_normalized" -> 7.

    Top-level hooks such as "hook_embed" run before block 0 and give -1.
    """
    match = re.match(r"blocks\.(\d+)\.", hook)
    if match:
        return int(match[1])
    if hook.startswith("hook_"):
        return -1
    raise UsageError(f"hook {hook!r} is not inside a block; use a blocks.N.* or hook_embed hook")
