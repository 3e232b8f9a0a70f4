"""SAEBench in the lab: what `python -m nn_decomp.saebench` runs. The engine is sae-bench 0.6.0 itself
(its pins: numpy < 2, datasets < 4) in its own Python (bridge.py, `bash setup_env.sh --with sae-bench`);
the lab checks the input, exports each dictionary in SAELens' format (unit decoder rows: saelens.py),
builds the offline data, drives the worker (workers/saebench_evals.py) and files the results.

Data, all offline: core and autointerp read the checkpoint's held-out contexts (data/heldout.py, the
text its run never trained on); sparse probing reads labelled sets split by document (data/probing.py:
SOTU party / era / president, or a JSONL file); absorption needs only the tokenizer's vocabulary.
The model is the lab's own (SmolLM2 from its cached TL weights, or a TransformerLens name online).

What the evals mean here. An SAE takes all four. A transcoder (or skip transcoder) is scored through
its encoder side only: sparse probing and autointerp read its latents on its input hook, as for an
SAE; core would splice its MLP-output reconstruction into its input hook and absorption compares its
decoder rows (output space) with a probe of the residual stream, so both are refused. A CLT is
scored layer by layer the same way: each layer's latents on that layer's input hook, read in the units
of everything the latent writes (its decoder rows to every later layer, concatenated, have norm 1 —
the scale sparse probing's latent selection by class-mean difference sees; autointerp's per-latent
quantiles do not depend on it). Crosscoders (one encoder over several layers at once) and MOLTs have
no SAELens form: refused.
Absorption is SAEBench's first-letter task at `blocks.L.hook_resid_post`, the only hook it reads.

Per checkpoint: `saebench/<eval>.json` (SAEBench's result JSON as written) and `saebench.json`, one flat
row ({eval}.{metric}: SAEBench's eval_result_metrics flattened; a CLT's per layer, `<eval>.layer<L>.json`
and {eval}.layer<L>.{metric} for model layer L; {eval}.seconds: the eval's wall time
over every checkpoint of its worker call) that
`python -m nn_decomp.collect` reads beside the training metrics.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from nn_decomp.config import UsageError, check_command
from nn_decomp.data.heldout import heldout_contexts, text_config
from nn_decomp.data.probing import labelled_split, load_records
from nn_decomp.dictionaries import HookedDictionary, checkpoint_list
from nn_decomp.interop.bridge import WORKERS, Tool, require_python, run_worker
from nn_decomp.interop.formats import write_dir
from nn_decomp.interop.saelens import saelens_files
from nn_decomp.models import SMOLLM2, hub_name, resolve_device, smollm2_dir
from nn_decomp.runtime.checkpoint import read_config
from nn_decomp.runtime.files import write_atomic
from nn_decomp.runtime.sweep_table import SAEBENCH, flatten

SAE_BENCH = Tool("sae-bench")
WORKER = WORKERS / "saebench_evals.py"
RESULT, RESULTS_DIR = SAEBENCH, "saebench"  # the flat row collect reads, SAEBench's JSONs
ENCODER_SIDE = ("sparse_probing", "autointerp")  # what a transcoder takes: its latents on its input hook
ABSORPTION_HOOK = "hook_resid_post"


def takes(d: HookedDictionary, arch: str) -> tuple[str, ...]:
    """The evals this dictionary can be scored by (module docstring: why)."""
    if arch == "sae":
        return ("core", "sparse_probing", "autointerp") + (("absorption",) if d.hooks_in[0].endswith(ABSORPTION_HOOK)
                                                           else ())
    return ENCODER_SIDE if arch in ("transcoder", "skip_transcoder", "clt") else ()


def read_row(path: Path) -> dict:
    file = path / RESULT
    return json.loads(file.read_text()) if file.exists() else {}


def done_evals(path: Path) -> set[str]:
    return {key.split(".", 1)[0] for key in read_row(path)}


class Job:
    """One checkpoint to score: its dictionary, config, and the evals left to run."""

    def __init__(self, path: Path, evals: list[str], overwrite: bool):
        self.path = path
        self.cfg, self.meta = read_config(path)
        self.dictionary = HookedDictionary.load(path)
        arch = self.meta["arch"]
        refused = [e for e in evals if e not in takes(self.dictionary, arch)]
        if refused:
            why = ("SAEBench reads SAEs and, through their encoder side, transcoders and CLT layers"
                   if not takes(self.dictionary, arch) else f"absorption reads {ABSORPTION_HOOK} only" if arch == "sae"
                   else f"a{' CLT' if arch == 'clt' else ' transcoder'} is scored through its encoder side only "
                        "(sparse_probing, autointerp)")
            raise UsageError(f"{path} (arch={arch}, {self.dictionary.hooks_in[0]}) cannot take evals {refused}: {why}; "
                             f"pass evals={list(takes(self.dictionary, arch)) or '[]'}")
        # {part: SAELens files}, refusing what SAELens cannot hold; a CLT's parts are its layers
        self.parts = ({f"layer{layer}": saelens_files(self.dictionary, self.meta, self.cfg, clt_layer=i)
                       for i, layer in enumerate(self.dictionary.layers)} if arch == "clt"
                      else {"": saelens_files(self.dictionary, self.meta, self.cfg)})
        self.evals = [e for e in evals if overwrite or e not in done_evals(path)]

    @property
    def model(self) -> tuple:
        return self.meta["model"], self.cfg.model.get("first_n_layers")

    @property
    def heldout(self) -> str:
        """What decides its held-out text: checkpoints scored in one worker share it."""
        text = text_config(self.cfg, self.meta)
        return json.dumps([OmegaConf.to_container(text.data), text.train.seed])


def model_spec(name: str, first_n_layers: int | None, cache_dir: str) -> dict:
    if name == SMOLLM2:
        return {"dir": str(smollm2_dir(cache_dir)), "first_n_layers": first_n_layers}
    return {"name": name}


def load_tokenizer(name: str, cache_dir: str):
    return AutoTokenizer.from_pretrained(smollm2_dir(cache_dir) if name == SMOLLM2 else hub_name(name))


def probing_data(cfg: DictConfig) -> dict:
    """{set name: {"train": {label: texts}, "test": ...}} for every probing set (checked before any LM)."""
    data = {}
    for spec in cfg.probing_sets:
        name = Path(spec).stem if spec.endswith(".jsonl") else spec
        data[name] = labelled_split(load_records(spec), cfg.probe_train_per_class, cfg.probe_test_per_class,
                                    cfg.probe_test_fraction, cfg.seed, name)
    if not data:
        raise UsageError("probing_sets=[]: name at least one set (sotu_party, sotu_era, sotu_president or a JSONL file)")
    return data


def n_contexts(job: Job, n_tokens: int, batch: int) -> int:
    """Held-out contexts covering n_tokens, a whole number of LM batches (core counts its batches)."""
    return max(1, math.ceil(n_tokens / text_config(job.cfg, job.meta).data.context_size / batch)) * batch


def contexts(job: Job, tokenizer, n_tokens: int, batch: int):
    """The first n_contexts(job, n_tokens, batch) held-out contexts (document order: a smaller count
    is a prefix of a larger one)."""
    ckpt_cfg = text_config(job.cfg, job.meta)
    context_size = ckpt_cfg.data.context_size
    n_contexts_ = n_contexts(job, n_tokens, batch)
    found = heldout_contexts(ckpt_cfg, tokenizer, n_contexts_ * context_size)
    if len(found) < n_contexts_:
        raise UsageError(f"{job.path}: the held-out split has {len(found)} contexts of {context_size} tokens, fewer than "
                         f"the {n_contexts_} asked: lower core_tokens / autointerp_tokens or llm_batch_size")
    return found


def settings(cfg: DictConfig, model_name: str, n_core_contexts: int) -> dict:
    """Each eval's config fields (SAEBench's own config classes); sizes from ours."""
    common = {"model_name": model_name, "llm_dtype": "float32"}
    batches = n_core_contexts // cfg.llm_batch_size
    return {"core": common | {"batch_size_prompts": cfg.llm_batch_size, "n_eval_reconstruction_batches": batches,
                              "n_eval_sparsity_variance_batches": batches, "exclude_special_tokens_from_reconstruction": True,
                              # every metric, as sae-bench's multiple_evals sets them
                              "compute_kl": True, "compute_ce_loss": True, "compute_l2_norms": True,
                              "compute_sparsity_metrics": True, "compute_variance_metrics": True,
                              "compute_featurewise_density_statistics": True,
                              "compute_featurewise_weight_based_metrics": True},
            # the SAE's latents on the vocabulary's activations once, not once per (k, letter) probe
            "absorption": common | {"llm_batch_size": cfg.llm_batch_size, "random_seed": cfg.seed,
                                    "precalc_k_sparse_probe_sae_acts": True},
            "sparse_probing": common | {"llm_batch_size": cfg.llm_batch_size, "random_seed": cfg.seed,
                                        "context_length": cfg.probe_context_length},
            "autointerp": common | {"llm_batch_size": cfg.llm_batch_size, "random_seed": cfg.seed,
                                    "n_latents": cfg.autointerp_latents}}


def score_group(cfg: DictConfig, jobs: list[Job], evals: list[str], probing: dict | None) -> None:
    """One worker call: `evals` on every job's dictionary (one model, one held-out text); results filed
    per checkpoint."""
    name, first_n_layers = jobs[0].model
    tokenizer = load_tokenizer(name, cfg.cache_dir) if {"core", "autointerp"} & set(evals) else None
    wanted = {e: n for e, n in (("core", cfg.core_tokens), ("autointerp", cfg.autointerp_tokens)) if e in evals}
    tensors = {}
    if wanted:  # the held-out text read and tokenized once, each eval taking its prefix
        tokens = contexts(jobs[0], tokenizer, max(wanted.values()), cfg.llm_batch_size)
        tensors = {f"{e}_contexts": {"tokens": tokens[:n_contexts(jobs[0], n, cfg.llm_batch_size)]}
                   for e, n in wanted.items()}
    n_core = len(tensors["core_contexts"]["tokens"]) if "core" in evals else cfg.llm_batch_size
    with tempfile.TemporaryDirectory(prefix="saebench_") as tmp:
        saes, names = [], {}  # names[(job, part)]: the worker's name of that SAE
        for i, job in enumerate(jobs):
            for part, files in job.parts.items():
                names[i, part] = f"sae{i}_{part}" if part else f"sae{i}"
                write_dir(Path(tmp) / names[i, part], files, overwrite=False)
                saes.append({"name": names[i, part], "dir": str(Path(tmp) / names[i, part])})
        args = {"saes": saes, "model": model_spec(name, first_n_layers, cfg.cache_dir), "device": str(resolve_device(cfg.device)),
                "evals": evals, "out": str(Path(tmp) / "results"), "settings": settings(cfg, name, n_core),
                "probing": probing if "sparse_probing" in evals else None,
                "judge": {"kind": cfg.judge, "url": cfg.judge_url, "model": cfg.judge_model,
                          "api_key_env": cfg.judge_api_key_env}}
        answer = run_worker(SAE_BENCH, WORKER, args, tensors)
        for i, job in enumerate(jobs):
            file_results(job, {e: {part: Path(answer["files"][e][names[i, part]]) for part in job.parts} for e in evals},
                         answer["seconds"])


def file_results(job: Job, files: dict[str, dict[str, Path]], seconds: dict[str, float]) -> None:
    """SAEBench's JSON per eval (and CLT layer) into <checkpoint>/saebench/, its metrics into the flat row."""
    row = read_row(job.path)
    (job.path / RESULTS_DIR).mkdir(exist_ok=True)
    for name, part_files in files.items():
        row = {k: v for k, v in row.items() if not k.startswith(f"{name}.")}
        for part, file in part_files.items():
            key = f"{name}.{part}" if part else name
            result = json.loads(file.read_text())
            write_atomic(job.path / RESULTS_DIR / f"{key}.json", json.dumps(result, indent=1))
            row |= {f"{key}.{k}": v for k, v in flatten(result["eval_result_metrics"]).items()}
        row[f"{name}.seconds"] = seconds[name]
    write_atomic(job.path / RESULT, json.dumps(row, indent=1))


def saebench(cfg: DictConfig) -> dict[Path, dict]:
    """Score every checkpoint; returns {checkpoint: its flat row}."""
    check_command(cfg)
    require_python(SAE_BENCH)
    if "autointerp" in cfg.evals and cfg.judge == "openai" and not os.environ.get(cfg.judge_api_key_env):
        raise UsageError(f"judge=openai reads its API key from ${cfg.judge_api_key_env}, which is unset: export it, "
                         "or set judge_api_key_env to the variable that holds it (or use judge=offline)")
    jobs = [Job(path, list(cfg.evals), cfg.overwrite) for path in checkpoint_list(cfg)]
    probing = probing_data(cfg) if any("sparse_probing" in job.evals for job in jobs) else None
    groups = defaultdict(list)
    for job in jobs:
        if job.evals:
            groups[(job.model, job.heldout, tuple(job.evals))].append(job)
    for (_, _, evals), group in groups.items():
        score_group(cfg, group, list(evals), probing)
    return {job.path: read_row(job.path) for job in jobs}

