"""SAEBench 0.6.0's own evals (core, absorption, sparse_probing, autointerp) on our dictionaries,
in sae-bench's environment: the bridge worker behind `python -m nn_decomp.saebench`
(nn_decomp/interop/saebench.py).

args: {"saes": [{"name", "dir" (a SAELens export: cfg.json + sae_weights.safetensors)}],
"model": {"dir": DIR (HF config + tokenizer + tl_weights.safetensors, TL-processed), "first_n_layers"}
or {"name": a TransformerLens name}, "device", "evals": [...], "out": DIR (SAEBench's result JSONs,
<eval>/<name>_custom_sae_eval_results.json, and its artifacts), "settings": {eval: fields of that
eval's config class}, "probing": {set: {"train": {class: [texts]}, "test": {class: [texts]}}},
"judge": {"kind": "offline" | "openai", "url", "model", "api_key_env"}}.
tensors: "core_contexts", "autointerp_contexts": {"tokens": [C, T] held-out token ids}.
result: {"files": {eval: {name: PATH}}, "seconds": {eval: s}}.

What is patched, and why (sae-bench's code is otherwise run as shipped):
- every eval's `HookedTransformer.from_pretrained_no_processing` returns the model built here from the
  lab's files (offline, and processed as the dictionaries were trained: fold_ln), never fetched;
- `run_with_cache` with a names_filter and no stop_at_layer stops after the last named layer (absorption
  runs full forwards for one residual hook: ~10x the work on a 30-layer model);
- datasets: core reads the lab's held-out contexts (a pre-tokenized Dataset), autointerp the same
  tokens, sparse probing the lab's labelled sets (`probing`) in place of its Hub datasets;
- autointerp's LLM calls go to the lab's judge: an OpenAI-compatible endpoint, or offline_judge.py;
- an SAE that rescales its input to norm √d (SAELens' constant_norm_rescale: ours with act.token_norm)
  maps a zero row to NaN latents, and sparse probing zeroes padded positions before encoding and masks
  by a product, so one padded text made every probe's input NaN: a zero row keeps scale 1 (zero_rows_safe);
  absorption reads such an SAE's latents in the input's units (latents_in_input_units: it compares
  latent × decoder cosine with the raw input's probe projection).
"""
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from offline_judge import respond as offline_response  # siblings: this script's dir is first on sys.path
from protocol import serve

# sparse probing's jaxtyping hints name one dimension for the probe's train set and for its positives
# (half of it): with checks on, every run dies in a shape check, so they are off, read at import.
os.environ["JAXTYPING_DISABLE"] = "1"
TL_WEIGHTS = "tl_weights.safetensors"  # nn_decomp.models: TL parameters with fold_ln applied
PROCESSING = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)


def build_model(spec: dict, device: str):
    from transformer_lens import HookedTransformer
    import transformer_lens.loading_from_pretrained as tl_loading
    from transformers import AutoTokenizer

    if "name" in spec:
        return HookedTransformer.from_pretrained(spec["name"], device=device, **PROCESSING)
    src = Path(spec["dir"])
    cfg = tl_loading.get_pretrained_model_config(str(src), fold_ln=True, device=device,
                                                 first_n_layers=spec.get("first_n_layers"))
    model = HookedTransformer(cfg, AutoTokenizer.from_pretrained(src), move_to_device=False)
    with safe_open(src / TL_WEIGHTS, framework="pt") as weights, torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights.get_tensor(name))
    model.move_model_modules_to_device()
    return model


def stop_early(model) -> None:
    """run_with_cache(names_filter=[hooks]) without stop_at_layer: stop after the last named block."""
    full = model.run_with_cache

    def run_with_cache(*args, names_filter=None, stop_at_layer=None, **kwargs):
        names = [names_filter] if isinstance(names_filter, str) else names_filter
        if stop_at_layer is None and isinstance(names, list) and names:
            blocks = [re.match(r"blocks\.(\d+)\.", n) for n in names]
            if all(blocks):
                stop_at_layer = 1 + max(int(b.group(1)) for b in blocks)
        return full(*args, names_filter=names_filter, stop_at_layer=stop_at_layer, **kwargs)

    model.run_with_cache = run_with_cache


def judge_response(judge: dict):
    """AutoInterp.get_api_response(self, messages, max_tokens, n_completions) through the lab's judge."""
    from tabulate import tabulate

    def respond(self, messages, max_tokens, n_completions=1):
        if judge["kind"] == "offline":
            responses = [offline_response(messages)] * n_completions
        else:
            from openai import OpenAI

            client = OpenAI(api_key=os.environ[judge["api_key_env"]], base_url=judge["url"])
            result = client.chat.completions.create(model=judge["model"], messages=messages, n=n_completions,
                                                    max_tokens=max_tokens, stream=False)
            responses = [choice.message.content.strip() for choice in result.choices]
        logs = tabulate([m.values() for m in messages + [{"role": "assistant", "content": responses[0]}]],
                        tablefmt="simple_grid", maxcolwidths=[None, 120])
        return responses, logs

    return respond


# --- the evals ----------------------------------------------------------------------------------------
def core(saes, model, device, out: Path, settings: dict, contexts: torch.Tensor, **_) -> None:
    """sae-bench's core `run_evals` per SAE (not `multiple_evals`, which logs and skips any error)."""
    from datasets import Dataset
    from sae_lens.training.activations_store import ActivationsStore
    from sae_bench.evals.core import main as core_main
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.sae_bench_utils import general_utils, get_eval_uuid, get_sae_bench_version, get_sae_lens_version

    config = CoreEvalConfig(context_size=contexts.shape[1], dataset="nn_decomp held-out contexts", **settings)
    tokenizer = model.tokenizer
    ignore = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
    for name, sae in saes:
        store = ActivationsStore.from_sae(model, sae, context_size=contexts.shape[1], device=device,
                                          dataset=Dataset.from_dict({"input_ids": contexts.tolist()}),
                                          store_batch_size_prompts=config.batch_size_prompts)
        metrics, feature_metrics = core_main.run_evals(sae, store, model, config, ignore_tokens=ignore)
        metrics["misc_metrics"] = core_main.calculate_misc_metrics(feature_metrics)
        result = {"unique_id": name, "sae_set": name, "sae_id": "custom_sae", "eval_cfg": config,
                  "metrics": metrics, "feature_metrics": feature_metrics}
        core_main.save_single_eval_result(core_main.replace_nans_with_negative_one(result), get_eval_uuid(),
                                          get_sae_lens_version(), get_sae_bench_version(),
                                          general_utils.get_results_filepath(str(out), name, "custom_sae"), sae)


@contextmanager
def latents_in_input_units(saes):
    """Absorption weighs each latent by activation × cos(probe, decoder row) and compares the sum with
    the probe's projection of the raw input: a latent's contribution in input space only if the decoder
    row has norm 1 and the input was not rescaled. constant_norm_rescale encodes x·√d/‖x‖ (and divides
    the reconstruction back), so there the latents are read × ‖x‖/√d, their contribution to the
    reconstruction of x itself (every latent of a token by one factor: which fire is unchanged)."""
    rescaled = [sae for _, sae in saes if sae.cfg.normalize_activations == "constant_norm_rescale"]
    for sae in rescaled:
        def encode(x, encode=sae.encode, d_in=sae.cfg.d_in):
            return encode(x) * (x.norm(dim=-1, keepdim=True) / d_in ** 0.5)
        sae.encode = encode
    yield
    for sae in rescaled:
        del sae.encode  # the class's own again, for the other evals (an error ends the worker)


def absorption(saes, model, device, out: Path, settings: dict, **_) -> None:
    from sae_bench.evals.absorption import main as absorption_main
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig

    config = AbsorptionEvalConfig(**settings)
    with latents_in_input_units(saes):
        absorption_main.run_eval(config, saes, device, str(out), force_rerun=True)


def sparse_probing(saes, model, device, out: Path, settings: dict, probing: dict, **_) -> None:
    from sae_bench.evals.sparse_probing import main as probing_main
    from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig
    from sae_bench.sae_bench_utils import dataset_info, dataset_utils

    dataset_info.chosen_classes_per_dataset.update({name: list(s["train"]) for name, s in probing.items()})
    dataset_utils.get_multi_label_train_test_data = lambda name, *_: (probing[name]["train"], probing[name]["test"])
    config = SparseProbingEvalConfig(dataset_names=list(probing), **settings)
    probing_main.run_eval(config, saes, device, str(out), force_rerun=True, clean_up_activations=True,
                          artifacts_path=str(out / "artifacts"))


def autointerp(saes, model, device, out: Path, settings: dict, contexts: torch.Tensor, judge: dict, **_) -> None:
    from sae_bench.evals.autointerp import main as autointerp_main
    from sae_bench.evals.autointerp.eval_config import AutoInterpEvalConfig
    from sae_bench.sae_bench_utils import dataset_utils

    autointerp_main.AutoInterp.get_api_response = judge_response(judge)
    dataset_utils.load_and_tokenize_dataset = lambda *_: contexts
    config = AutoInterpEvalConfig(total_tokens=contexts.numel(), llm_context_size=contexts.shape[1], **settings)
    autointerp_main.run_eval(config, saes, device, api_key="", output_path=str(out), force_rerun=True,
                             artifacts_path=str(out / "artifacts"))


EVALS = {"core": core, "absorption": absorption, "sparse_probing": sparse_probing, "autointerp": autointerp}


def zero_rows_safe(sae):
    """`sae` with constant_norm_rescale scaling a zero row by 1, not √d/0 (module docstring); any other
    row as SAELens scales it."""
    if sae.cfg.normalize_activations != "constant_norm_rescale":
        return sae

    def norm_in(x: torch.Tensor) -> torch.Tensor:
        norm = x.norm(dim=-1, keepdim=True)
        sae.x_norm_coeff = torch.where(norm > 0, sae.cfg.d_in ** 0.5 / norm, torch.ones_like(norm))
        return x * sae.x_norm_coeff

    sae.run_time_activation_norm_fn_in = norm_in
    return sae


def run(args: dict, tensors: dict[str, Path]) -> dict:
    from sae_lens import SAE
    from sae_bench.sae_bench_utils import general_utils
    from transformer_lens import HookedTransformer

    device = args["device"]
    model = build_model(args["model"], device)
    stop_early(model)
    HookedTransformer.from_pretrained_no_processing = lambda *_, **__: model  # every eval's loader
    # as sae-bench formats a custom SAE (hook_layer, hook_name on cfg; warns on non-unit decoder rows)
    saes = [(s["name"], zero_rows_safe(general_utils.load_and_format_sae(
        s["name"], SAE.load_from_disk(s["dir"], device=device), device)[1])) for s in args["saes"]]
    tokens = {name: load_file(file)["tokens"] for name, file in tensors.items()}
    out = Path(args["out"])
    files, seconds = {}, {}
    for name in args["evals"]:
        start = time.time()
        eval_out = out / name
        eval_out.mkdir(parents=True, exist_ok=True)
        os.chdir(eval_out)  # absorption writes its artifacts under the working dir
        EVALS[name](saes, model, device, eval_out, args["settings"].get(name, {}), contexts=tokens.get(f"{name}_contexts"),
                    probing=args.get("probing"), judge=args.get("judge"))
        seconds[name] = time.time() - start
        files[name] = {s: str(eval_out / f"{s}_custom_sae_eval_results.json") for s, _ in saes}
        missing = [f for f in files[name].values() if not Path(f).exists()]
        if missing:
            sys.exit(f"sae-bench's {name} eval wrote no result for {missing} (see its output above)")
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
    return {"files": files, "seconds": seconds}


if __name__ == "__main__":
    serve(run)
