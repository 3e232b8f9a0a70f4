"""Several dictionaries from one activation stream (`train.train_together`, `hydra/launcher=shared_stream`):
each gets exactly what it would get as a separate job, while the LM runs once for all."""
import json

import torch

from helpers import one_thread  # noqa: F401 (a fixture)
from nn_decomp.data.store import ActivationsStore
from nn_decomp.runtime.checkpoint import TRAINER_STATE
from nn_decomp.runtime.jobs import run_cli
from nn_decomp.runtime.sweep_table import read_status
from nn_decomp.runtime.trainer import Run
from nn_decomp.runtime.training import stream_key, train, train_together
from test_train import tiny_cfg

# one stream (transcoder hooks of layer 1), four dictionaries: k, activation, latents, dtype differ
KINDS = {"topk4": ("topk", "act.k=4"), "topk8": ("topk", "act.k=8"), "batchtopk": ("batchtopk", "arch.n_latents=96"),
         "jumprelu_bf16": ("jumprelu", "train.dtype=bfloat16")}


def kind_cfg(name: str, *overrides: str):
    act, extra = KINDS[name]
    return tiny_cfg("transcoder", act, extra, *overrides)


def lm_passes(monkeypatch) -> list[int]:
    count = [0]
    activations = ActivationsStore._activations

    def counted(self, tokens_BT):
        count[0] += 1
        return activations(self, tokens_BT)

    monkeypatch.setattr(ActivationsStore, "_activations", counted)
    return count


def same_run(a, b) -> None:
    """Two run dirs hold the same training: trainer state (weights, optimizer, RNG, counters) bitwise,
    the same metrics and the same logged rows."""
    state_a, state_b = (torch.load(d / "checkpoint" / TRAINER_STATE, weights_only=False) for d in (a, b))
    for name, tensor in state_a["coder"].items():
        assert torch.equal(state_b["coder"][name], tensor), name
    assert torch.equal(state_a["torch_rng"], state_b["torch_rng"])
    assert torch.equal(state_a["tokens_since_fired"], state_b["tokens_since_fired"])
    metrics_a, metrics_b = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert metrics_a.pop("wall_time_s") > 0 and metrics_b.pop("wall_time_s") > 0
    assert metrics_a == metrics_b
    rows_a, rows_b = ((d / "metrics.jsonl").read_text().splitlines() for d in (a, b))
    assert rows_a == rows_b and len(rows_a) >= 8


def test_dictionaries_trained_together_equal_separate_runs_and_share_the_lm_passes(tiny_lm, tmp_path, monkeypatch):
    passes = lm_passes(monkeypatch)
    for name in KINDS:
        train(kind_cfg(name), tmp_path / "alone" / name, model=tiny_lm)
    alone = passes[0] / len(KINDS)
    passes[0] = 0
    assert len({stream_key(kind_cfg(name)) for name in KINDS}) == 1
    results = train_together([kind_cfg(name) for name in KINDS], [tmp_path / "together" / n for n in KINDS],
                             model=tiny_lm)
    assert passes[0] == alone  # one run's LM passes for all four (train + eval stream)
    for name, result in zip(KINDS, results):
        same_run(tmp_path / "alone" / name, tmp_path / "together" / name)
        assert result["steps"] == 16


def test_a_resumed_run_and_a_fresh_one_share_a_stream(tiny_lm, tmp_path):
    """The stream starts at the earliest run's step; the resumed one joins when the stream reaches it."""
    for name in ("topk4", "batchtopk"):
        train(kind_cfg(name), tmp_path / "alone" / name, model=tiny_lm)
    train(kind_cfg("topk4", "train.max_steps=6"), tmp_path / "together" / "topk4", model=tiny_lm)
    train_together([kind_cfg("topk4", "train.resume=true"), kind_cfg("batchtopk")],
                   [tmp_path / "together" / "topk4", tmp_path / "together" / "batchtopk"], model=tiny_lm)
    for name in ("topk4", "batchtopk"):
        state_a, state_b = (torch.load(tmp_path / d / name / "checkpoint" / TRAINER_STATE, weights_only=False)
                            for d in ("alone", "together"))
        for key, tensor in state_a["coder"].items():
            assert torch.equal(state_b["coder"][key], tensor), (name, key)


def test_a_failing_run_stops_alone(tiny_lm, tmp_path, monkeypatch):
    step = Run.step

    def failing(self, x, y, eval_set):
        if self.run_dir.name == "bad" and self.trainer.step == 3:
            raise FloatingPointError("loss is nan")
        return step(self, x, y, eval_set)

    monkeypatch.setattr(Run, "step", failing)
    good, bad = train_together([kind_cfg("topk4"), kind_cfg("topk8")], [tmp_path / "good", tmp_path / "bad"],
                               model=tiny_lm)
    assert isinstance(bad, FloatingPointError) and not (tmp_path / "bad" / "metrics.json").exists()
    assert good["steps"] == 16 and (tmp_path / "good" / "metrics.json").exists()


def test_shared_stream_launcher_writes_each_job_as_the_basic_launcher_does(tmp_path, one_thread):
    """The same sweep through both launchers: per-job run dirs, configs, status and checkpoints alike;
    two streams (two batch sizes) become two groups."""
    sweep = ["--multirun", "data=synthetic", "arch=sae", "arch.n_latents=64", "act=topk", "act.k=4,8",
             "train.batch_size=128,256", "train.n_tokens=6400", "train.eval_tokens=512", "train.eval_every=10",
             "train.log_every=5"]
    for launcher in ("basic", "shared_stream"):
        assert run_cli("nn_decomp.train", [*sweep, f"hydra/launcher={launcher}",
                                           f"hydra.sweep.dir={tmp_path / launcher}"]) == 0
    jobs = sorted(p.name for p in (tmp_path / "basic").iterdir() if p.is_dir())
    assert len(jobs) == 4 and jobs == sorted(p.name for p in (tmp_path / "shared_stream").iterdir() if p.is_dir())
    for job in jobs:
        same_run(tmp_path / "basic" / job, tmp_path / "shared_stream" / job)
        assert read_status(tmp_path / "shared_stream" / job)["status"] == "completed"
        assert (tmp_path / "shared_stream" / job / ".hydra" / "overrides.yaml").exists()


def test_per_layer_transcoders_and_a_clt_share_one_stream_of_their_layers(tiny_lm, tmp_path, monkeypatch):
    """A full-depth set in one pass: a transcoder per layer and a CLT over those layers read one
    stream of every layer, each its own slice, and train exactly as they would alone."""
    cfgs = {"layer0": tiny_cfg("transcoder", "topk", "arch.layers=[0]"),
            "layer2": tiny_cfg("skip_transcoder", "topk", "arch.layers=[2]"),
            "clt": tiny_cfg("clt", "topk", "arch.layers=[0,1,2]")}
    passes = lm_passes(monkeypatch)
    for name, cfg in cfgs.items():
        train(cfg, tmp_path / "alone" / name, model=tiny_lm)
    alone = passes[0] / len(cfgs)
    passes[0] = 0
    assert len({stream_key(cfg) for cfg in cfgs.values()}) == 1
    train_together(list(cfgs.values()), [tmp_path / "together" / name for name in cfgs], model=tiny_lm)
    assert passes[0] == alone
    for name in cfgs:
        same_run(tmp_path / "alone" / name, tmp_path / "together" / name)


def test_runs_on_other_hooks_do_not_share_a_stream():
    assert stream_key(tiny_cfg("transcoder", "topk")) != stream_key(tiny_cfg("sae", "topk"))
