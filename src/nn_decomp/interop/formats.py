"""What the format writers (`saelens`, `circuit_tracer`) share: the weights a loaded dictionary
exports (decoders with their feature scale folded in, inference thresholds), the hint to convert a
TopK dictionary first, and the atomic write of a format's directory (a Hugging Face model folder too)."""
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

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


def convert_hint(d: HookedDictionary) -> str:
    return (f"convert it first: python -m nn_decomp.convert checkpoint={d.path} to=jumprelu, "
            "then export the converted checkpoint")


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
