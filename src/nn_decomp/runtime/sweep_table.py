"""The sweep table: one row per job of a sweep (or run) dir, read from what its jobs left behind
(`python -m nn_decomp.collect` writes it; the sweep-end callback in jobs.py prints its summary).

A job is a directory under DIR holding a Hydra record (`.hydra/overrides.yaml`), a
`status.json`, a `metrics.json` or a `checkpoint/`. Its row has, in this order:
- `job` (path relative to DIR), `status` (completed | failed | preempted | running | incomplete; see
  `job_status`), `attempts`, `error`;
- `overrides` (the command-line overrides as one string) and one column per override key
  (`arch`, `act`, `act.k`, ...), values parsed as YAML;
- the job's config flattened with dotted keys (`arch.n_latents`, `train.n_tokens`, ...): the
  checkpoint's resolved `config.yaml`, else Hydra's `.hydra/config.yaml` (a job that failed before
  its first checkpoint);
- every metric of `metrics.json` (training's final eval) as is, every metric of `eval.json`
  (`python -m nn_decomp.evaluate`, in the checkpoint dir or the job dir) prefixed `eval.`, and the
  flat row of `saebench.json` (`python -m nn_decomp.saebench`, in the checkpoint dir) prefixed
  `saebench.`; list values become JSON strings.

`write_table` writes the rows as CSV and, when pyarrow imports, as Parquet next to it. `status.json` is
read here and written by `jobs.JobStatusCallback` (jobs imports this module: the table is read in
one place).
"""
import csv
import json
import os
import socket
from pathlib import Path
from typing import Any

import yaml

STATUS_JSON = "status.json"
CHECKPOINT, METRICS, EVAL, SAEBENCH = "checkpoint", "metrics.json", "eval.json", "saebench.json"
FIRST_COLUMNS = ["job", "status", "attempts", "error", "overrides"]
SKIP_DIRS = {CHECKPOINT, ".hydra", ".submitit", "checkpoint.tmp", "checkpoint.old", "checkpoint.prev",
             "checkpoint.damaged", "wandb"}


def read_status(job_dir: Path) -> dict:
    path = Path(job_dir) / STATUS_JSON
    return json.loads(path.read_text()) if path.exists() else {}


def is_job_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (".hydra/overrides.yaml", STATUS_JSON, METRICS, CHECKPOINT))


def find_jobs(root: Path) -> list[Path]:
    """Job dirs under root (root itself if it is one), never looking inside a job's own outputs."""
    root = Path(root)
    if is_job_dir(root):
        return [root]
    jobs = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in SKIP_DIRS):
        jobs += find_jobs(child)
    return jobs


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists (and empty dicts) stay values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_override(override: str) -> tuple[str, Any]:
    """'act.k=16' -> ('act.k', 16); '+x=..' / '~x' keep their key without the prefix."""
    key, _, value = override.partition("=")
    key = key.lstrip("+~")
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError:
        parsed = value
    return key, value if isinstance(parsed, dict) else parsed


def job_config(job_dir: Path) -> dict[str, Any]:
    for path in (job_dir / CHECKPOINT / "config.yaml", job_dir / ".hydra" / "config.yaml"):
        if path.exists():
            return flatten(yaml.safe_load(path.read_text()) or {})
    return {}


def job_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if path.exists():
        return list(yaml.safe_load(path.read_text()) or [])
    return list(read_status(job_dir).get("overrides", []))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def job_status(job_dir: Path, status: dict, metrics: dict) -> tuple[str, str | None]:
    """(status, error): status.json's word when the job ended (completed, failed, preempted);
    otherwise inferred: metrics.json means it completed (a run from before the callback), "running"
    whose process is gone from this host means it was killed (failed), a checkpoint without
    metrics.json means it stopped mid-training (incomplete), and nothing at all means it failed
    before training."""
    word, error = status.get("status"), status.get("error")
    if word in ("completed", "failed", "preempted"):
        return word, error
    if metrics:
        return "completed", error
    if word == "running":
        if process_gone(status):
            return "failed", f"its process (pid {status['pid']} on {status['host']}) is gone: killed (SIGKILL, out of memory?)"
        return "running", error
    return ("incomplete" if (job_dir / CHECKPOINT).exists() else "failed"), error


def process_gone(status: dict) -> bool:
    """Whether the job's process is known to be gone: it ran on this host and its pid is free (a job
    on another host cannot be checked from here)."""
    if status.get("host") != socket.gethostname() or not status.get("pid"):
        return False
    try:
        os.kill(status["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def job_row(job_dir: Path, root: Path) -> dict[str, Any]:
    status = read_status(job_dir)
    metrics = read_json(job_dir / METRICS)
    evals = read_json(job_dir / CHECKPOINT / EVAL) or read_json(job_dir / EVAL)
    overrides = job_overrides(job_dir)
    row: dict[str, Any] = {
        "job": str(job_dir.relative_to(root)) if job_dir != root else job_dir.name,
        "attempts": status.get("attempts"), "overrides": " ".join(overrides)}
    row["status"], row["error"] = job_status(job_dir, status, metrics)
    row |= dict(parse_override(o) for o in overrides if not o.startswith("hydra"))
    row |= {k: v for k, v in job_config(job_dir).items() if k not in row}
    row |= metrics
    row |= {f"eval.{k}": v for k, v in flatten(evals).items()}
    row |= {f"saebench.{k}": v for k, v in read_json(job_dir / CHECKPOINT / SAEBENCH).items()}
    return row


def collect(root: str | Path) -> list[dict[str, Any]]:
    """One row per job under `root`, in directory order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: pass a sweep dir (outputs/sweeps/...) or a run dir")
    return [job_row(job, root) for job in find_jobs(root)]


def columns(rows: list[dict]) -> list[str]:
    seen = dict.fromkeys(FIRST_COLUMNS)
    for row in rows:
        seen |= dict.fromkeys(row)
    return list(seen)


def cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def write_table(rows: list[dict], out: str | Path) -> list[Path]:
    """CSV at `out` (+ Parquet beside it when pyarrow imports); returns the paths written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = columns(rows)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows({c: cell(row.get(c)) for c in cols} for row in rows)
    written = [out]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    # Parquet needs one type per column: a column mixing kinds (a number in one job, text in
    # another) is written as text.
    table = {}
    for c in cols:
        values = [cell(row.get(c)) for row in rows]
        kinds = {bool if isinstance(v, bool) else float if isinstance(v, (int, float)) else str
                 for v in values if v is not None}
        table[c] = values if len(kinds) <= 1 else [None if v is None else str(v) for v in values]
    pq.write_table(pa.table(table), out.with_suffix(".parquet"))
    return written + [out.with_suffix(".parquet")]


def summary(rows: list[dict]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines = [f"{len(rows)} jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    lines += [f"  {row['status']:9} {row['job']}  " + (f"({row['error']})" if row.get("error") else job_metrics(row))
              for row in rows]
    return "\n".join(lines)


def job_metrics(row: dict) -> str:
    """The held-out numbers of a job's row, where it has them."""
    names = {"nmse": "FVU {:.4f}", "l0": "L0 {:.1f}", "dead_fraction_eval": "dead {:.1%}"}
    return "  ".join(f.format(row[k]) for k, f in names.items() if isinstance(row.get(k), (int, float)))
