"""Faults a long run meets, each ending in one line or a recovery with nothing lost: a signal
(preemption, Ctrl-C), damaged checkpoints, a full disk, an unwritable run dir, a resume that does
not fit, two runs into one dir, non-finite activations, an unknown model, an empty corpus."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import compose_cfg
from nn_decomp.config import UsageError
from nn_decomp.data.store import ActivationsStore
from nn_decomp.export import export
from nn_decomp.models import check_model_name
from nn_decomp.runtime import checkpoint as checkpoint_module, training as training_module
from nn_decomp.runtime.checkpoint import (CHECKSUMS, TRAINER_STATE, WEIGHTS, DamagedCheckpoint, load_dictionary,
                                         save_checkpoint, verify)
from nn_decomp.runtime.files import previous, siblings
from nn_decomp.runtime.jobs import hold_run_dir
from nn_decomp.runtime.trainer import NonFiniteLoss
from nn_decomp.runtime.training import train
from test_export import export_cfg
from test_train import tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# planted data, no LM: a run of 200 steps that a signal can catch in the middle
SYNTHETIC = ["data=synthetic", "arch=sae", "act=topk", "act.k=8", "arch.n_latents=512", "train.batch_size=256",
             "train.n_tokens=51200", "train.checkpoint_every=100000", "train.eval_every=100", "train.log_every=1",
             "train.eval_tokens=1024", "train.device=cpu", "model.device=cpu"]


def trained_coder(run_dir) -> dict:
    return torch.load(run_dir / "checkpoint" / TRAINER_STATE, weights_only=False)["coder"]


def assert_same_weights(a: dict, b: dict) -> None:
    for name, tensor in a.items():  # the same float operations in the same order: bitwise
        assert torch.equal(b[name], tensor), name


def train_steps_logged(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return sum('"split": "train"' in line for line in path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    train(compose_cfg(*SYNTHETIC), run)
    return trained_coder(run)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_at_the_step_and_resume_auto_ends_bitwise_equal(signum, uninterrupted, tmp_path):
    run = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "nn_decomp.train", *SYNTHETIC, f"hydra.run.dir={run}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})  # slow enough to be caught mid-run
    deadline = time.time() + 300
    while train_steps_logged(run) < 20 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"stopped by {signal.Signals(signum).name} after step ") and "train.resume=auto" in line
    step = int(line.split("after step ")[1].split(":")[0])
    assert 20 <= step < 200
    meta = json.loads((run / "checkpoint" / "metadata.json").read_text())
    assert meta["step"] == step == train_steps_logged(run)  # nothing lost beyond the step in flight
    status = json.loads((run / "status.json").read_text())
    assert (status["status"], status["step"], status["signal"]) == ("preempted", step, signal.Signals(signum).name)
    train(compose_cfg(*SYNTHETIC, "train.resume=auto"), run)
    assert_same_weights(uninterrupted, trained_coder(run))
    assert train_steps_logged(run) == 200


def test_an_error_line_marks_a_single_runs_status_failed(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nn_decomp.train", *SYNTHETIC, "train.resume=true",
                           f"hydra.run.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: train.resume=true but")
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "failed" and "train without resume first" in status["error"]


def flip_a_byte(path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tiny_lm, tmp_path, caplog):
    train(tiny_cfg("transcoder", "topk"), tmp_path / "full", model=tiny_lm)
    run = tmp_path / "run"
    train(tiny_cfg("transcoder", "topk", "train.max_steps=10"), run, model=tiny_lm)  # checkpoints at 8, 10
    assert json.loads((previous(run / "checkpoint") / "metadata.json").read_text())["step"] == 8
    flip_a_byte(run / "checkpoint" / TRAINER_STATE)  # loads silently without a checksum: NaN in Adam's state
    with caplog.at_level(logging.WARNING):
        train(tiny_cfg("transcoder", "topk", "train.resume=true"), run, model=tiny_lm)
    assert f"{TRAINER_STATE} is damaged" in caplog.text and "resuming from the previous checkpoint (step 8)" in caplog.text
    assert (run / "checkpoint.damaged").exists()
    assert_same_weights(trained_coder(tmp_path / "full"), trained_coder(run))


def test_a_damaged_checkpoint_with_nothing_before_it_is_one_line_naming_the_file(tiny_lm, tmp_path):
    train(tiny_cfg("transcoder", "topk", "train.max_steps=6", "train.keep_last=1"), tmp_path, model=tiny_lm)
    assert not previous(tmp_path / "checkpoint").exists()
    (tmp_path / "checkpoint" / TRAINER_STATE).write_bytes((tmp_path / "checkpoint" / TRAINER_STATE).read_bytes()[:999])
    with pytest.raises(DamagedCheckpoint, match=rf"{TRAINER_STATE} is damaged: 999 bytes, .* written, and there is no "
                                                r"earlier checkpoint to fall back to \(train.keep_last=2"):
        train(tiny_cfg("transcoder", "topk", "train.resume=true"), tmp_path, model=tiny_lm)


def test_damaged_weights_are_refused_by_every_reader_in_one_line(tiny_lm, tmp_path):
    train(tiny_cfg("transcoder", "topk", "train.max_steps=4"), tmp_path, model=tiny_lm)
    ckpt = tmp_path / "checkpoint"
    flip_a_byte(ckpt / WEIGHTS, 0.9)
    with pytest.raises(DamagedCheckpoint, match=f"{WEIGHTS} is damaged: its contents changed"):
        load_dictionary(ckpt)
    with pytest.raises(UsageError, match=f"{WEIGHTS} is damaged"):
        export(export_cfg(f"checkpoint={ckpt}", "format=saelens", f"out={tmp_path / 'sl'}"))
    (ckpt / CHECKSUMS).unlink()  # as written before checksums: safetensors' own check still says which file
    (ckpt / WEIGHTS).write_bytes(b"\x00" * 16)
    with pytest.raises(DamagedCheckpoint, match=f"{WEIGHTS} is damaged"):
        load_dictionary(ckpt)


def test_non_finite_weights_are_refused(tiny_lm, tmp_path):
    cfg = tiny_cfg("transcoder", "topk")
    coder = checkpoint_module.build_coder(cfg, 32, 32)
    with torch.no_grad():
        coder.W_enc[0, 3, 1] = float("nan")
    save_checkpoint(tmp_path, coder, cfg, {"d_in": 32, "d_out": 32})
    with pytest.raises(DamagedCheckpoint, match="holds non-finite values in W_enc"):
        load_dictionary(tmp_path)


def test_a_full_disk_ends_in_one_line_keeping_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg("transcoder", "topk")
    coder = checkpoint_module.build_coder(cfg, 32, 32)
    path = tmp_path / "checkpoint"
    save_checkpoint(path, coder, cfg, {"d_in": 32, "d_out": 32, "step": 1}, {"step": 1}, keep_last=2)

    def full_disk(obj, file):
        file.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(UsageError, match=rf"disk full writing the checkpoint {path}: it needs about .* MiB are free "
                                         r"on that disk; .* \(the previous checkpoint is intact\)"):
        save_checkpoint(path, coder, cfg, {"d_in": 32, "d_out": 32, "step": 2}, {"step": 2}, keep_last=2)
    assert not siblings(path)[0].exists()  # the partial files gave their space back
    verify(path, (WEIGHTS, TRAINER_STATE))
    assert json.loads((path / "metadata.json").read_text())["step"] == 1


def test_an_unwritable_run_dir_is_refused_before_the_lm_loads(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setattr(training_module, "setup", lambda *a: pytest.fail("the LM was loaded"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UsageError, match="cannot write the run dir .*a_file/run .*hydra.run.dir=DIR"):
        train(tiny_cfg("transcoder", "topk"), tmp_path / "a_file" / "run", model=tiny_lm)


@pytest.mark.parametrize("key, flags", [("hydra.run.dir", []), ("hydra.sweep.dir", ["--multirun"])])
def test_an_unwritable_run_dir_on_the_command_line_is_one_line_before_hydra_writes_there(key, flags, tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"
    proc = subprocess.run([sys.executable, "-m", "nn_decomp.train", *flags, *SYNTHETIC, f"{key}={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: cannot write {key}={out} ({tmp_path / 'a_file'}: not a "
                                                f"directory): pick a writable one with {key}=DIR"]


def test_a_resume_with_another_config_names_the_keys_and_leaves_the_checkpoint(tiny_lm, tmp_path, monkeypatch):
    train(tiny_cfg("transcoder", "topk", "train.max_steps=6"), tmp_path, model=tiny_lm)
    monkeypatch.setattr(training_module, "setup", lambda *a: pytest.fail("the LM was loaded"))
    with pytest.raises(UsageError, match=r"was trained with another config \(arch.n_latents: 64 in the checkpoint, "
                                         r"32 now; act.k: 4 in the checkpoint, 8 now\)"):
        train(tiny_cfg("transcoder", "topk", "train.resume=true", "arch.n_latents=32", "act.k=8"), tmp_path,
              model=tiny_lm)
    verify(tmp_path / "checkpoint", checkpoint_module.CHECKPOINT_FILES)


def test_resuming_a_finished_run_is_refused_and_its_metrics_kept(tiny_lm, tmp_path):
    train(tiny_cfg("transcoder", "topk"), tmp_path, model=tiny_lm)
    metrics = (tmp_path / "metrics.json").read_bytes()
    with pytest.raises(UsageError, match="holds a finished run .*step 16 of 16.*train.resume=auto"):
        train(tiny_cfg("transcoder", "topk", "train.resume=true"), tmp_path, model=tiny_lm)
    assert train(tiny_cfg("transcoder", "topk", "train.resume=auto"), tmp_path, model=tiny_lm) == json.loads(metrics)
    assert (tmp_path / "metrics.json").read_bytes() == metrics


def test_a_second_run_into_a_held_run_dir_is_refused_and_a_dead_runs_lock_is_not(tiny_lm, tmp_path, monkeypatch):
    with hold_run_dir(tmp_path):
        with pytest.raises(UsageError, match=rf"{tmp_path} is in use by a run \(pid {os.getpid()} on .*\): wait"):
            train(tiny_cfg("transcoder", "topk"), tmp_path, model=tiny_lm)
    assert (tmp_path / ".lock").exists()  # left behind, as by a killed run: the kernel has released it
    train(tiny_cfg("transcoder", "topk", "train.max_steps=2"), tmp_path, model=tiny_lm)


def test_non_finite_activations_name_the_data_not_the_learning_rate(tiny_lm, tmp_path, monkeypatch):
    real_next = ActivationsStore.next_batch
    calls = []

    def next_batch(self):
        x, y = real_next(self)
        calls.append(1)
        if len(calls) == 17:  # the batch of step 6 (the first calls fill the eval set and the init rows)
            x = x.clone()
            x[7] = float("nan")
        return x, y

    monkeypatch.setattr(ActivationsStore, "next_batch", next_batch)
    with pytest.raises(NonFiniteLoss, match="at step 6; .* 1 of 128 activation rows of this batch hold NaN / Inf: "
                                            "the data is bad, not the learning rate"):
        train(tiny_cfg("transcoder", "topk"), tmp_path, model=tiny_lm)
    assert json.loads((tmp_path / "checkpoint" / "metadata.json").read_text())["step"] == 4  # the last good one


def test_non_finite_held_out_rows_are_refused_before_training(tiny_lm, tmp_path, monkeypatch):
    real_open = training_module.open_source

    def poisoned(*args):
        source = real_open(*args)
        source.eval_set[1][3, 0, 0] = float("inf")
        return source

    monkeypatch.setattr(training_module, "open_source", poisoned)
    monkeypatch.setattr(training_module, "train_encoder", lambda *a: pytest.fail("training started"))
    with pytest.raises(UsageError, match="1 of 256 held-out rows from the activations hold NaN / Inf"):
        train(tiny_cfg("transcoder", "topk"), tmp_path, model=tiny_lm)


def test_an_unknown_model_name_lists_close_matches_not_every_model():
    with pytest.raises(UsageError, match=r"model.name='gtp2-small' is not a model TransformerLens knows; close "
                                         r"matches: gpt2-small, .*\(the offline default: model=smollm2_135m\)$"):
        check_model_name("gtp2-small")
    check_model_name("gpt2")


def test_an_empty_corpus_is_called_empty(tiny_lm, tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("\n  \n")
    with pytest.raises(UsageError, match=r"the corpus data.path='.*\*.txt' is empty: its 2 file\(s\) hold no text"):
        train(tiny_cfg("transcoder", "topk", "data.source=text", f"data.path={tmp_path}/*.txt"), tmp_path / "run",
              model=tiny_lm)
