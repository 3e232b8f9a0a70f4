"""`python -m nn_decomp.attribute`: graph scores with pruned nodes as error on a hand-made graph, the
refusals before any model loads, the lab's side of the bridge (a fake worker in our Python), and,
opt-in where circuit-tracer's own Python exists, a 2-layer SmolLM2 set attributed end to end."""
import json
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import CONF, forbid_loading
from nn_decomp.config import UsageError
from nn_decomp.interop import attribution
from nn_decomp.interop.attribution import attribute
from nn_decomp.interop.bridge import find_python
from nn_decomp.interop.circuit_tracer import CIRCUIT_TRACER
from nn_decomp.interop.workers.graph_scores import Layout, cancellation, pruned_scores
from test_export import fake_hf_model, random_checkpoint
from test_graph_page import graph as frontend_graph

# [feature, error, token, logit]; rows are targets: the feature reads the token (3) and the error
# (1); the logit reads the feature (2), the error (1) and the token (1).
ADJACENCY = torch.tensor([[0.0, 1.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 1.0, 0.0]])
LAYOUT = Layout(n_features=1, n_errors=1, n_tokens=1, n_logits=1)


def test_scores_of_a_whole_graph_are_circuit_tracers():
    # influence: feature 1/2, error 1/4 + 1/2·1/4, token 1/4 + 1/2·3/4; completeness weighs each
    # node's non-error input share by its influence + logit weight (error and token nodes: share 1)
    replacement, completeness = pruned_scores(ADJACENCY, torch.tensor([1.0]), LAYOUT)
    assert replacement == pytest.approx(0.625 / (0.625 + 0.375))
    assert completeness == pytest.approx((0.5 * 0.75 + 0.375 + 0.625 + 1 * 0.75) / (0.5 + 0.375 + 0.625 + 1))


def test_a_pruned_node_counts_as_error():
    # without the feature the logit keeps 1/4 of its input (the token's): 3/4 is error
    kept = torch.tensor([False, True, True, True])
    replacement, completeness = pruned_scores(ADJACENCY, torch.tensor([1.0]), LAYOUT, node_mask=kept)
    assert replacement == pytest.approx(0.25)
    assert completeness == pytest.approx((0.25 + 0.25 + 0.75) / (1.25 + 0.75))
    edges = torch.ones(4, 4, dtype=torch.bool)
    edges[3, 0] = False  # the same graph through a pruned edge
    assert pruned_scores(ADJACENCY, torch.tensor([1.0]), LAYOUT, edge_mask=edges)[0] == pytest.approx(replacement)


def test_cancellation_is_one_when_inputs_agree_and_grows_when_they_cancel():
    assert cancellation(ADJACENCY, LAYOUT) == {"features": 1.0, "logits": 1.0}
    cancelling = ADJACENCY.clone()
    cancelling[0, 2] = -3.0  # the feature receives +1 and -3: |sum| 2 of 4 in all
    cancelling[3, 1] = -1.0  # the logit: 2 - 1 + 1 = 2 of 4
    assert cancellation(cancelling, LAYOUT) == {"features": 2.0, "logits": 2.0}


def attribute_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("attribute", overrides=["device=cpu", *overrides])


def layer_set(tmp_path, act: str = "jumprelu", layers=(0, 1, 2), d: int = 12) -> str:
    paths = [random_checkpoint(tmp_path / f"tc{i}", "transcoder", act, f"arch.layers=[{i}]", seed=i, d=d)[0]
             for i in layers]
    return f"checkpoints=[{','.join(map(str, paths))}]"


@pytest.fixture
def no_models(monkeypatch):
    forbid_loading(monkeypatch, (attribution, "run_worker"))


@pytest.mark.parametrize("case, message", [
    ("no_prompts_file", "does not exist: pass a text file with one prompt per line"),
    ("empty_prompts", "holds no prompt"),
    ("no_environment", "bash setup_env.sh --with circuit-tracer"),
    ("missing_layer", r"cover 2 layers \(missing \[2\]\)"),
    ("topk", r"convert first with python -m nn_decomp.convert checkpoints=\[.*\], then rerun with checkpoints="),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, monkeypatch, no_models, case, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# only a comment\n\n" if case == "empty_prompts" else "The cat sat on the\n")
    if case == "no_environment":
        monkeypatch.setenv(CIRCUIT_TRACER.env_var, str(tmp_path / "no_python"))
    else:
        monkeypatch.setenv(CIRCUIT_TRACER.env_var, "python")  # some Python: the checks after it run
    hf, _ = fake_hf_model(tmp_path / "hf", 3)
    checkpoints = layer_set(tmp_path, "topk" if case == "topk" else "jumprelu",
                            (0, 1) if case == "missing_layer" else (0, 1, 2))
    prompt_file = tmp_path / "none.txt" if case == "no_prompts_file" else prompts
    with pytest.raises(UsageError, match=message):
        attribute(attribute_cfg(checkpoints, f"prompts={prompt_file}", f"out={tmp_path / 'out'}", f"hf_model={hf}"))
    assert not (tmp_path / "out").exists()


def fake_worker(calls: list):
    """Writes what the circuit-tracer worker writes, with made-up scores (replacement 0.1·(i+1))."""
    def run(tool, worker, args, tensors=None, timeout=None):
        calls.append(args)
        for i, prompt in enumerate(args["prompts"]):
            (tmp := frontend_graph())["metadata"]["slug"] = prompt["slug"]
            (Path(prompt["files"]) / f"{prompt['slug']}.json").write_text(json.dumps(tmp))
            result = {"slug": prompt["slug"], "prompt": prompt["text"], "replacement": 0.1 * (i + 1),
                      "completeness": 0.8, "feature_nodes": 5, "seconds": 1.0, "at_completeness": None,
                      "cancellation": {"features": 2.0, "logits": 3.0},
                      "pruned": {"nodes": 9, "edges": 8, "error_node_share": 0.2, "replacement": 0.05,
                                 "completeness": 0.7}}
            Path(prompt["result"]).write_text(json.dumps(result))
        return {"results": []}
    return run


def test_attribute_scores_each_prompt_once_and_summarises(tmp_path, monkeypatch, tiny_lm):
    import nn_decomp.models

    monkeypatch.setenv(CIRCUIT_TRACER.env_var, "python")
    calls = []
    monkeypatch.setattr(attribution, "run_worker", fake_worker(calls))
    monkeypatch.setattr(nn_decomp.models, "load_model", lambda *args, **kwargs: tiny_lm)
    monkeypatch.setattr(nn_decomp.models, "model_n_layers", lambda *args, **kwargs: 3)
    hf, _ = fake_hf_model(tmp_path / "hf", 3, d=32)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat sat on the\n# a comment\nOne, two, three,\n")
    cfg = attribute_cfg(layer_set(tmp_path, d=32), f"prompts={prompts}", f"out={tmp_path / 'out'}", f"hf_model={hf}",
                        "batch_size=16", "dashboard='dash/layer{layer}/dashboard.html'")  # quoted: braces
    summary = attribute(cfg)
    (args,) = calls
    assert [p["text"] for p in args["prompts"]] == ["The cat sat on the", "One, two, three,"]
    assert args["settings"]["batch_size"] == 16 and args["backend"] == "nnsight" and args["model"] == str(hf)
    assert (tmp_path / "out" / "export" / "config.yaml").exists()
    assert summary["n_prompts"] == 2
    assert summary["scores"]["replacement"]["mean"] == pytest.approx(0.15)
    assert summary["scores"]["replacement"]["stderr"] == pytest.approx(0.05)  # std 0.0707 / sqrt 2
    kl = summary["scores"]["replacement_kl"]
    assert kl["n"] == 2 and kl["mean"] > 0  # random dictionaries move the tiny model's output
    for p in args["prompts"]:
        result = json.loads((tmp_path / "out" / "prompts" / f"{p['slug']}.json").read_text())
        assert 0 <= result["replacement_top1_agreement"] <= 1
        assert 'href="dash/layer0/dashboard.html#feature-5"' in (tmp_path / "out" / "pages" / f"{p['slug']}.html").read_text()
    assert len((tmp_path / "out" / "summary.csv").read_text().splitlines()) == 3
    attribute(cfg)  # every prompt has its scores: the worker is not run again
    assert len(calls) == 1
    old_result = tmp_path / "out" / "prompts" / f"{args['prompts'][1]['slug']}.json"
    old_result.write_text(json.dumps({k: v for k, v in json.loads(old_result.read_text()).items() if k != "cancellation"}))
    attribute(cfg)  # a result from before a score was added: rescored from its saved graph, alone
    assert [p["text"] for p in calls[1]["prompts"]] == ["One, two, three,"] and calls[1]["reuse_graphs"]


def test_a_run_cut_short_keeps_its_graphs_and_the_rerun_does_the_rest(tmp_path, monkeypatch, tiny_lm):
    import nn_decomp.models
    from nn_decomp.interop.bridge import WorkerError

    monkeypatch.setenv(CIRCUIT_TRACER.env_var, "python")
    monkeypatch.setattr(nn_decomp.models, "load_model", lambda *args, **kwargs: tiny_lm)
    monkeypatch.setattr(nn_decomp.models, "model_n_layers", lambda *args, **kwargs: 3)
    calls, worker = [], fake_worker([])

    def first_then_killed(tool, script, args, tensors=None, timeout=None):
        calls.append([p["text"] for p in args["prompts"]])
        worker(tool, script, args | {"prompts": args["prompts"][:1]})
        if len(calls) == 1:
            raise WorkerError("killed after its first graph")

    monkeypatch.setattr(attribution, "run_worker", first_then_killed)
    hf, _ = fake_hf_model(tmp_path / "hf", 3, d=32)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat sat on the\nOne, two, three,\n")
    cfg = attribute_cfg(layer_set(tmp_path, d=32), f"prompts={prompts}", f"out={tmp_path / 'out'}", f"hf_model={hf}")
    with pytest.raises(WorkerError):
        attribute(cfg)
    summary = attribute(cfg)
    assert calls == [["The cat sat on the", "One, two, three,"], ["One, two, three,"]]
    assert summary["n_prompts"] == summary["n_prompts_given"] == 2
    assert summary["scores"]["replacement_kl"]["n"] == 2  # the first graph got our scores on the rerun


# --- circuit-tracer itself, in its own Python (opt-in) ------------------------------------------

needs_circuit_tracer = pytest.mark.skipif(
    find_python(CIRCUIT_TRACER) is None, reason=f"opt-in: create circuit-tracer's Python with "
    f"`{CIRCUIT_TRACER.setup_command}` (or set {CIRCUIT_TRACER.env_var})")


@needs_circuit_tracer
def test_circuit_tracer_attributes_a_two_layer_smollm2_set_and_scores_it(tmp_path):
    """End to end on a 2-layer SmolLM2: scores in [0, 1], ours of the whole graph equal to
    circuit-tracer's, pruning only loses completeness; with zeroed decoders no feature has any
    influence, so none survives pruning, while loud ones (random decoders × 50) do. (A random
    CLT's features at their own scale are too quiet to survive either; and with 2 layers the
    replacement score barely moves: the embedding's direct path is most of the token influence.)"""
    from nn_decomp.interop.formats import write_hf_dir
    from nn_decomp.runtime.checkpoint import read_config, save_checkpoint
    hf = write_hf_dir(tmp_path / "smol2", 2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n")
    results, checkpoints = {}, {}
    for name, decoder_scale in (("zeroed", 0.0), ("loud", 50.0)):
        ckpt, coder = random_checkpoint(tmp_path / name, "clt", "jumprelu", "arch.layers=[0,1]", d=576,
                                        model="smollm2_135m")
        checkpoints[name] = ckpt
        cfg, meta = read_config(ckpt)
        with torch.no_grad():
            for w in coder.decoder_weights():
                w.mul_(decoder_scale)
        save_checkpoint(ckpt, coder, cfg, meta)
        summary = attribute(attribute_cfg(f"checkpoint={ckpt}", f"prompts={prompts}", f"out={tmp_path / name / 'out'}",
                                          f"hf_model={hf}", "max_feature_nodes=256"))
        (slug,) = [p.stem for p in (tmp_path / name / "out" / "prompts").glob("*.json")]
        results[name] = json.loads((tmp_path / name / "out" / "prompts" / f"{slug}.json").read_text())
        assert summary["n_prompts"] == 1 and (tmp_path / name / "out" / "pages" / f"{slug}.html").exists()
    print("circuit-tracer attribution:", {k: (r["replacement"], r["completeness"]) for k, r in results.items()})
    for r in results.values():
        assert 0 <= r["replacement"] <= 1 and 0 <= r["completeness"] <= 1
        assert r["rescored"]["replacement"] == pytest.approx(r["replacement"], abs=1e-4)
        assert r["rescored"]["completeness"] == pytest.approx(r["completeness"], abs=1e-4)
        assert r["pruned"]["completeness"] <= r["completeness"] + 1e-6
        assert sum(t["prob"] for t in r["top_logits"]) <= 1 + 1e-6
    assert results["zeroed"]["pruned"]["feature_nodes"] == 0 < results["loud"]["pruned"]["feature_nodes"]
    # a result from before a score was added gets it from the saved graph, the rest kept as it was
    out = tmp_path / "loud" / "out"
    result = out / "prompts" / f"{slug}.json"
    result.write_text(json.dumps({k: v for k, v in results["loud"].items() if k != "cancellation"}))
    attribute(attribute_cfg(f"checkpoint={checkpoints['loud']}", f"prompts={prompts}", f"out={out}",
                            f"hf_model={hf}", "max_feature_nodes=256"))
    assert json.loads(result.read_text()) == results["loud"]
    # the worker's edge contraction (workers/grouped_scores.py) against circuit-tracer's own, unpatched
    subprocess.run([str(find_python(CIRCUIT_TRACER)), "-c", UNPATCHED_GRAPH, str(out / "export"), str(hf),
                    str(out / "graphs" / f"{slug}.pt"), "The capital of France is"], check=True)


UNPATCHED_GRAPH = """
import sys, torch
from pathlib import Path
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.graph import Graph
from circuit_tracer.utils.caching import load_transcoders_from_cache
export, hf, graph, prompt = Path(sys.argv[1]), sys.argv[2], Graph.from_pt(sys.argv[3]), sys.argv[4]
transcoders, _ = load_transcoders_from_cache(export.name, cache_dir=export.parent, lazy_decoder=False)
model = ReplacementModel.from_pretrained_and_transcoders(hf, transcoders, backend="nnsight", dtype=torch.float32)
theirs = attribute(prompt, model, batch_size=64, max_feature_nodes=256).adjacency_matrix
ours = graph.adjacency_matrix
print("grouped vs circuit-tracer's contraction: max |diff|", (ours - theirs).abs().max().item(), "of", theirs.abs().max().item())
assert ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())
"""
