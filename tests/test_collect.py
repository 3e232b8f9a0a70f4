"""`python -m nn_decomp.collect`: one row per job of a sweep dir, failed and unfinished jobs
included with their status; CSV and Parquet hold the same table."""
import csv
import json
import os
import socket
import subprocess

import pytest
import yaml

from nn_decomp.collect import main
from nn_decomp.runtime.jobs import write_status
from nn_decomp.runtime.sweep_table import collect, flatten, job_status, parse_override, write_table

CONFIG = {"arch": {"name": "transcoder", "layers": [2], "n_latents": 64},
          "act": {"_target_": "nn_decomp.core.activations.TopK", "k": 8}, "train": {"n_tokens": 1280}}


def make_job(root, name, overrides, status=None, metrics=None, evals=None, checkpoint=True, k=8):
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = json.loads(json.dumps(CONFIG))
    config["act"]["k"] = k
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if checkpoint:
        (job / "checkpoint").mkdir()
        (job / "checkpoint" / "config.yaml").write_text(yaml.safe_dump(config))
    if status:
        write_status(job, status)
    if metrics:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if evals:
        (job / "checkpoint" / "eval.json").write_text(json.dumps(evals))
    return job


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    (root / ".submitit").mkdir(parents=True)
    (root / "multirun.yaml").write_text("{}")
    make_job(root, "0_act.k=8", ["act.k=8"], {"status": "completed", "attempts": 1},
             {"nmse": 0.25, "l0": 8.0, "steps": 10}, {"nmse": 0.3, "ce_recovered_zero": 0.9, "l0_per_layer": [8.0]})
    make_job(root, "1_act.k=300", ["act.k=300"], {"status": "failed", "attempts": 1,
             "error": "AssertionError: act.k=300 must be < arch.n_latents=64"}, checkpoint=False, k=300)
    make_job(root, "2_act.k=16", ["act.k=16"], {"status": "running", "attempts": 2}, k=16)  # killed mid-run
    make_job(root, "3_act.k=32", ["act.k=32"], None, {"nmse": 0.1, "l0": 32.0}, k=32)  # before status.json
    # python -m nn_decomp.saebench's flat row
    (root / "0_act.k=8" / "checkpoint" / "saebench.json").write_text(json.dumps(
        {"absorption.mean.mean_absorption_fraction_score": 0.21, "core.sparsity.l0": 8.0}))
    return root


def test_one_row_per_job_with_status_overrides_config_and_metrics(sweep):
    rows = collect(sweep)
    assert [r["job"] for r in rows] == ["0_act.k=8", "1_act.k=300", "2_act.k=16", "3_act.k=32"]
    assert [r["status"] for r in rows] == ["completed", "failed", "running", "completed"]
    ok, failed, running, legacy = rows
    assert ok["act.k"] == 8 and ok["overrides"] == "act.k=8" and ok["arch.n_latents"] == 64
    assert ok["nmse"] == 0.25 and ok["steps"] == 10
    assert ok["eval.nmse"] == 0.3 and ok["eval.ce_recovered_zero"] == 0.9 and ok["eval.l0_per_layer"] == [8.0]
    assert ok["saebench.absorption.mean.mean_absorption_fraction_score"] == 0.21 and ok["saebench.core.sparsity.l0"] == 8.0
    assert not any(k.startswith("saebench.") for k in legacy)
    assert failed["act.k"] == 300 and "must be < arch.n_latents" in failed["error"] and "nmse" not in failed
    assert failed["arch.name"] == "transcoder"  # from .hydra/config.yaml: no checkpoint was written
    assert running["attempts"] == 2 and legacy["l0"] == 32.0


def test_csv_and_parquet_hold_the_same_rows(sweep, tmp_path):
    rows = collect(sweep)
    paths = write_table(rows, tmp_path / "out" / "runs.csv")
    with open(paths[0]) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and list(table[0])[:5] == ["job", "status", "attempts", "error", "overrides"]
    assert table[0]["eval.l0_per_layer"] == "[8.0]" and float(table[0]["nmse"]) == 0.25
    pq = pytest.importorskip("pyarrow.parquet")
    parquet = pq.read_table(paths[1]).to_pylist()
    assert [r["status"] for r in parquet] == [r["status"] for r in table]
    assert parquet[0]["nmse"] == 0.25 and parquet[1]["nmse"] is None


def test_cli_writes_the_table_and_lists_unfinished_jobs(sweep, capsys):
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "4 jobs: 2 completed, 1 failed, 1 running" in out and "1_act.k=300" in out
    assert (sweep / "runs.csv").exists()
    assert main([str(sweep), f"out={sweep.parent / 'x.csv'}"]) == 0 and (sweep.parent / "x.csv").exists()
    assert main([str(sweep), "bogus=1"]) == 2
    (sweep.parent / "empty").mkdir()
    assert main([str(sweep.parent / "empty")]) == 1
    with pytest.raises(FileNotFoundError, match="not a directory"):
        collect(sweep / "nope")


def test_a_single_run_dir_is_one_job(sweep):
    rows = collect(sweep / "0_act.k=8")
    assert len(rows) == 1 and rows[0]["job"] == "0_act.k=8" and rows[0]["status"] == "completed"


def test_status_is_inferred_where_status_json_does_not_say(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    assert job_status(tmp_path, {}, {}) == ("incomplete", None)
    assert job_status(tmp_path, {}, {"nmse": 1.0}) == ("completed", None)
    assert job_status(tmp_path / "none", {}, {}) == ("failed", None)
    assert job_status(tmp_path, {"status": "running"}, {"nmse": 1.0}) == ("completed", None)
    assert job_status(tmp_path, {"status": "preempted"}, {}) == ("preempted", None)
    # a job killed outright (SIGKILL, OOM) never writes its end: its process is gone from this host
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = {"status": "running", "host": socket.gethostname()}
    status, error = job_status(tmp_path, here | {"pid": dead.pid}, {})
    assert status == "failed" and f"pid {dead.pid}" in error and "is gone" in error
    assert job_status(tmp_path, here | {"pid": os.getpid()}, {}) == ("running", None)
    assert job_status(tmp_path, here | {"pid": dead.pid, "host": "elsewhere"}, {}) == ("running", None)


def test_flatten_and_parse_override():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}
    assert parse_override("act.k=16") == ("act.k", 16)
    assert parse_override("+arch.layers=[0,1]") == ("arch.layers", [0, 1])
    assert parse_override("act=topk") == ("act", "topk")
    assert parse_override("arch.hook_in='blocks.{layer}.x'") == ("arch.hook_in", "blocks.{layer}.x")
