"""Jobs: a status file per job, one run per run dir, and running the CLIs from scripts.

- `JobStatusCallback` (a Hydra callback, conf/hydra/default.yaml) writes `status.json` into every
  job's output dir: `running` when the job starts, then `completed` or `failed` with the error and
  its traceback. Hydra 1.3 already runs every job of a sweep when one raises (its `run_job` catches
  the exception into the JobReturn; the basic sweeper re-raises the first one only after the whole
  batch, so the command still exits non-zero); the file makes each failure visible to
  `python -m nn_decomp.collect` and to a person listing the sweep dir; when the sweep ends it prints
  one line per job (status, held-out metrics) and the collect command. `fail_fast=true`
  (`hydra.callbacks.job_status.fail_fast=true`) instead stops a basic-launcher sweep at the first
  failed job. A single run's `error:` exit marks it `failed`, a signal `preempted`
  (`exit_on_usage_error`); a job killed outright (OOM, SIGKILL) stays `running` with its host and
  pid, which `collect` reads as failed once that process is gone; `attempts` counts its starts.
- `hold_run_dir`: one run per run dir (an flock on `.lock`, released by the kernel with its process).
- A preempted or timed-out SLURM job is requeued by submitit into the same sweep subdir (the
  launcher's `checkpoint()` resubmits the same overrides, and the sweep dir's `${now:}` comes from the
  pickled config's resolver cache), so `train.resume=auto` (runtime/resume.py) is what makes it continue.
- `run_cli(module, args)`: `python -m module args` in this process (experiment scripts run several
  sweeps and evaluations without paying the imports each time) or as a subprocess.
- `UsageError` + `exit_on_usage_error`: what the evaluate / convert / export CLIs share: bad input
  ends the command with one `error: ...` line, while their plain functions raise it for tests.
"""
import atexit
import fcntl
import json
import logging
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from nn_decomp.config import UsageError
from nn_decomp.config.experiments import AnalysisConfig
from nn_decomp.runtime.files import unwritable, write_atomic
from nn_decomp.runtime.signals import Preempted
from nn_decomp.runtime.sweep_table import STATUS_JSON, collect, read_status, summary

log = logging.getLogger(__name__)


# --- status per job ----------------------------------------------------------------------------

def write_status(job_dir: Path, status: dict) -> None:
    write_atomic(Path(job_dir) / STATUS_JSON, json.dumps(status, indent=2))


def is_first_rank() -> bool:
    """False in every process but the first of a multi-process job (torchrun, or SLURM / submitit
    with several tasks): they all run the same Hydra job, and one status file is enough."""
    for var in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if os.environ.get(var, "0") != "0":
            return False
    return True


class JobStatusCallback(Callback):
    """Writes `status.json` into each job's output dir (module docstring); first rank only."""

    def __init__(self, fail_fast: bool = False):
        self.fail_fast = fail_fast
        self._start = 0.0
        self._summarised = False

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_unwritable(config, "hydra.run.dir")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_first_rank():
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        if (owner := lock_owner(job_dir)) is not None:  # before its status is touched: it is another run's
            raise SystemExit(f"error: {in_use(job_dir, owner)}")
        previous = read_status(job_dir)
        self._start = time.time()
        write_status(job_dir, {
            "status": "running", "attempts": previous.get("attempts", 0) + 1,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(), "pid": os.getpid(),
            "job_id": str(OmegaConf.select(config, "hydra.job.id", default="")),
            "overrides": list(OmegaConf.select(config, "hydra.overrides.task", default=[]))})

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not is_first_rank():
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        status = read_status(job_dir) | {"wall_time_s": round(time.time() - self._start, 3)}
        # JobReturn.return_value re-raises a failed job's exception: read the stored one.
        error = job_return._return_value if job_return.status.name == "FAILED" else None
        if error is None:
            write_status(job_dir, status | {"status": "completed"})
            return
        tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        write_status(job_dir, status | {"status": "failed", "error": f"{type(error).__name__}: {error}",
                                        "traceback": tb})
        # a single run has no hydra.job.num: reading it raised inside the callback (a spurious warning)
        num = OmegaConf.select(config, "hydra.job.num", default=None)
        name = "run" if num is None else f"job {num}"
        log.error(f"{name} failed ({job_dir}):\n{tb}")
        if self.fail_fast:
            # Hydra turns an Exception raised by a callback into a warning; SystemExit passes
            # through run_job and the launcher, which ends the sweep here.
            raise SystemExit(f"{name} failed and fail_fast=true: stopping the sweep")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A launcher that raises (submitit's, when a job was killed) never reaches on_multirun_end:
        # the summary is printed at exit then, with the dead job's status as collect infers it.
        refuse_unwritable(config, "hydra.sweep.dir")
        atexit.register(self.on_multirun_end, config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._summarised:
            return
        self._summarised = True
        sweep_dir = Path(config.hydra.sweep.dir)
        print(f"{summary(collect(sweep_dir))}\ntable: python -m nn_decomp.collect {sweep_dir}", flush=True)


def update_status(job_dir: Path, **fields) -> None:
    """Add `fields` to a job's status.json, if the job has one (runs under Hydra's callback do)."""
    if (Path(job_dir) / STATUS_JSON).exists():
        write_status(job_dir, read_status(job_dir) | fields)


def hydra_job_dir() -> Path | None:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def refuse_unwritable(config: DictConfig, key: str) -> None:
    """End the command in one line if the run (or sweep) dir cannot be created or written: before
    Hydra writes its config and log file there, which would end in its own traceback."""
    HydraConfig.instance().set_config(config)  # what Hydra does next: ${hydra:...} in the dir's name resolve
    out = Path(str(OmegaConf.select(config, key))).absolute()
    if (why := unwritable(out)) is not None:
        raise SystemExit(f"error: cannot write {key}={out} ({why}): pick a writable one with {key}=DIR")


# --- one run per run dir -----------------------------------------------------------------------

LOCK = ".lock"


def lock_owner(run_dir: Path) -> str | None:
    """Who holds `run_dir` (its lock's line), None if nobody: flock is released by the kernel when
    its process dies, so a lock file left by a killed run is free again."""
    path = Path(run_dir) / LOCK
    if not path.exists():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another process"
    return None


@contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` while training into it: a second run into the same dir is refused in one line
    (two would overwrite each other's checkpoint and interleave their metrics)."""
    f = open(Path(run_dir) / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise UsageError(in_use(run_dir, owner)) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    f.flush()
    try:
        yield
    finally:
        f.close()


def in_use(run_dir: Path, owner: str) -> str:
    return (f"{run_dir} is in use by a run ({owner}): wait for it to end, or train into another dir "
            "(hydra.run.dir=DIR)")


# --- sizes of the analyses of an experiment (conf/scale/*.yaml: `analysis`) ----------------------

def analysis_config(cfg: DictConfig) -> AnalysisConfig:
    """cfg.analysis checked against its schema (a typo fails here, naming the key)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AnalysisConfig), cfg.get("analysis") or {}))


# --- running the CLIs --------------------------------------------------------------------------

def exit_on_usage_error(run: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """A CLI's `main`: `run(cfg)`, a UsageError ending the process with `error: ...` (one line, no
    traceback; exit code 1) instead; NN_DECOMP_DEBUG=1 prints its traceback first (HYDRA_FULL_ERROR
    stays Hydra's own, for errors that are not the user's). It is raised in a sweep: Hydra records
    that job as failed in status.json and runs the others. A run with a status.json gets it marked
    failed; a signal that preempted training (runtime/signals.py) marks it preempted, hands the
    signal on to submitit's requeue if submitit runs the job, and exits with how to resume."""
    try:
        return run(cfg)
    except UsageError as e:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        if os.environ.get("NN_DECOMP_DEBUG") == "1":
            traceback.print_exc()
        mark_failed(f"{type(e).__name__}: {e}")
        sys.exit(f"error: {e}")
    except Preempted as stop:
        end_preempted(stop, [job_dir] if (job_dir := hydra_job_dir()) is not None else [])
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading the LM, evaluating): nothing to save
        mark_failed("interrupted (Ctrl-C) outside the training loop")
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)


def mark_failed(error: str) -> None:
    """A single run's status.json says how it ended (not when another run holds the dir: its status)."""
    if (job_dir := hydra_job_dir()) is not None and lock_owner(job_dir) is None:
        update_status(job_dir, status="failed", error=error)


def end_preempted(stop: Preempted, job_dirs: list[Path]) -> None:
    """Mark the jobs preempted, hand the signal on (submitit's requeue), exit saying how to resume."""
    for job_dir in job_dirs:
        update_status(job_dir, status="preempted", signal=signal.Signals(stop.signum).name, step=stop.step)
    stop.hand_on()
    print(f"stopped by {signal.Signals(stop.signum).name} after step {stop.step}: checkpoint written; continue "
          "with the same command and train.resume=auto", file=sys.stderr, flush=True)
    sys.exit(stop.exit_code)


def run_cli(module: str, args: list[str], in_process: bool = True, cwd: Path | None = None) -> int:
    """`python -m module *args`; returns its exit code. In process, the module runs as __main__
    under a patched argv (Hydra's multirun included); a failed Hydra job exits through SystemExit,
    which becomes the return code."""
    if not in_process:
        return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd).returncode
    argv = sys.argv
    sys.argv = [module, *args]
    GlobalHydra.instance().clear()  # @hydra.main initialises it and refuses to run twice
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
