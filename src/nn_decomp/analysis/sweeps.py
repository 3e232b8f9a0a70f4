"""What the experiment scripts (experiments/exp_NNN_*/run.py) share: run an experiment's sweeps
through the training CLI, evaluate its checkpoints with one loaded LM, Pareto fronts, plot files.

An experiment is `conf/experiment/<name>.yaml` at a scale (`conf/scale/`: smoke | cpu | gpu). Its
sweeps are `python -m nn_decomp.train --multirun experiment=<name> scale=<scale> <grid>`, one
per grid, all into `outputs/<name>/<scale>/sweep/` (the experiment config's hydra.sweep.dir, one
subdir per override set); plots and their CSVs go to `outputs/<name>/<scale>/`.
"""
import csv
import math
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from nn_decomp.analysis.evaluation import evaluate
from nn_decomp.config.experiments import AnalysisConfig  # importing the config package registers the schemas the configs start from
from nn_decomp.runtime.checkpoint import read_config
from nn_decomp.runtime.jobs import analysis_config, run_cli
from nn_decomp.runtime.sweep_table import collect, summary, write_table

CONF = Path(__file__).resolve().parents[3] / "conf"
SCALES = ("smoke", "cpu", "cpu_2m", "gpu")  # an experiment's sizes unless its run.py names its own (exp_007)


def compose_config(config_name: str, overrides: Sequence[str], hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=hydra)


@dataclass
class Experiment:
    """One experiment at one scale. `overrides` go to every job (e.g. `paths.root_dir=...`,
    `hydra/launcher=slurm_gpu hydra.launcher.partition=gpu`, `hydra.sweep.dir=...`)."""

    name: str
    scale: str = "cpu"
    overrides: list[str] = field(default_factory=list)
    in_process: bool = True

    def __post_init__(self):
        assert (CONF / "scale" / f"{self.scale}.yaml").exists(), f"scale={self.scale!r}: no conf/scale/{self.scale}.yaml"
        assert (CONF / "experiment" / f"{self.name}.yaml").exists(), f"no conf/experiment/{self.name}.yaml"

    @classmethod
    def from_args(cls, name: str, argv: Sequence[str], usage: str,
                  scales: Sequence[str] = SCALES) -> tuple["Experiment", set[str], list[str]]:
        """How every run.py starts: `run.py [scale=S] [--flag ...] [override ...] [PATH ...]` ->
        (the experiment at that scale, the flags, the paths); smoke runs take one thread. `scales`:
        the ones this experiment has sizes for."""
        scale, flags, overrides, paths = parse_args(argv, usage, scales[0] if "cpu" not in scales else "cpu")
        if scale not in scales:
            raise SystemExit(f"error: {name} has no scale={scale}: use one of {', '.join(scales)}")
        one_thread_if_smoke(scale)
        return cls(name, scale, overrides), flags, paths

    @property
    def base(self) -> list[str]:
        return [f"experiment={self.name}", f"scale={self.scale}"]

    def config(self, *extra: str) -> DictConfig:
        """The composed training config of one job (with the hydra node, for its dirs)."""
        return compose_config("config", [*self.base, *self.overrides, *extra], hydra=True)

    @property
    def analysis(self) -> AnalysisConfig:
        return analysis_config(self.config())

    @property
    def sweep_dir(self) -> Path:
        return Path(self.config().hydra.sweep.dir)

    @property
    def out_dir(self) -> Path:
        return self.sweep_dir.parent

    def sweep_args(self, grid: Sequence[str]) -> list[str]:
        return ["--multirun", *self.base, *self.overrides, *grid]

    def command(self, grid: Sequence[str]) -> str:
        """The shell command of one sweep, as the README shows it."""
        return "python -m nn_decomp.train " + " ".join(shlex.quote(a) for a in self.sweep_args(grid))

    def print_commands(self, grids: Iterable[Sequence[str]]) -> list[Path]:
        """`--print-commands`: print each sweep's command; returns the files written (none)."""
        print("\n".join(self.command(g) for g in grids))
        return []

    def run_sweeps(self, grids: Iterable[Sequence[str]]) -> list[dict]:
        """Run every grid (one --multirun each; a failed job does not stop the others), then
        collect the sweep dir: one row per job."""
        for grid in grids:
            print(f"$ {self.command(grid)}", flush=True)
            code = run_cli("nn_decomp.train", self.sweep_args(grid), self.in_process)
            if code:
                print(f"sweep exited with {code}: failed jobs are listed below", flush=True)
        return self.collect()

    def collect(self) -> list[dict]:
        rows = collect(self.sweep_dir)
        write_table(rows, self.out_dir / "runs.csv")
        print(summary(rows), flush=True)
        return rows


# --- evaluation ----------------------------------------------------------------------------------

def evaluation_model(analysis: AnalysisConfig, checkpoint: Path, device: str = "auto"):
    """The LM `checkpoint` was trained on, loaded once for every evaluation of an experiment (cut
    to `analysis.eval_lm_layers` blocks at scale=smoke)."""
    from nn_decomp.models import load_model  # transformer_lens: seconds, only when an LM is needed

    _, meta = read_config(checkpoint)
    cache_dir = OmegaConf.select(compose_config("config", []), "paths.cache_dir")  # this machine's
    return load_model(meta["model"], device, "float32", first_n_layers=analysis.eval_lm_layers, cache_dir=cache_dir)


def evaluate_checkpoints(checkpoints: Sequence[Path], analysis: AnalysisConfig, model=None,
                         out: Path | None = None) -> dict:
    """`python -m nn_decomp.evaluate checkpoint=A` (or `checkpoints=[A,B,..] out=DIR` for a set
    of per-layer transcoders), through its Python API with a shared `model`; returns eval.json."""
    cfg = compose_config("evaluate", ["overwrite=true", f"eval.n_tokens={analysis.eval_tokens}",
                                      f"eval.batch_contexts={analysis.eval_batch_contexts}",
                                      f"eval.per_layer={analysis.eval_per_layer}"])
    # Paths set here, not as overrides: any path may hold Hydra's special characters (a sweep dir
    # named before path_safe, a user's dir), which only the override grammar would trip on.
    paths = [str(Path(c).resolve()) for c in checkpoints]
    if len(paths) == 1 and out is None:
        cfg.checkpoint = paths[0]
    else:
        cfg.checkpoints, cfg.out = paths, str(Path(out).resolve())
    return evaluate(cfg, model=model)


def evaluate_jobs(rows: list[dict], sweep_dir: Path, analysis: AnalysisConfig, model=None) -> list[dict]:
    """Evaluate every completed job that has no eval.json yet; returns the re-collected rows."""
    todo = [sweep_dir / r["job"] / "checkpoint" for r in rows
            if r["status"] == "completed" and "eval.nmse" not in r]
    if todo and model is None:
        model = evaluation_model(analysis, todo[0])
    for ckpt in todo:
        print(f"evaluating {ckpt}", flush=True)
        evaluate_checkpoints([ckpt], analysis, model)
    return collect(sweep_dir)


# --- tables and plots ----------------------------------------------------------------------------

def number(value: Any) -> float:
    """A table cell as a float (NaN when missing or not a number)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def pareto_front(points: Sequence[tuple[float, float]], lower_y_is_better: bool = True) -> list[tuple[float, float]]:
    """The points no other point beats on both x (lower is better) and y; sorted by x."""
    front, best = [], math.inf
    for x, y in sorted(points, key=lambda p: (p[0], p[1] if lower_y_is_better else -p[1])):
        score = y if lower_y_is_better else -y
        if score < best:
            front.append((x, y))
            best = score
    return front


def write_points(rows: list[dict], path: Path, columns: Sequence[str]) -> Path:
    """The plotted numbers as CSV (the figure's data, one row per point)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({c: r.get(c) for c in columns} for r in rows)
    return path


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report_written(paths: list[Path]) -> list[Path]:
    """A run.py's last line: name the files it wrote, and return them."""
    print("wrote " + ", ".join(map(str, paths)))
    return paths


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def one_thread_if_smoke(scale: str) -> None:
    """Smoke runs share a small CPU with tests: one thread avoids oversubscription."""
    if scale == "smoke":
        torch.set_num_threads(1)


# --- reading a collected row -------------------------------------------------------------------

def act_name(row: dict) -> str:
    target = str(row.get("act._target_") or "")
    return target.rsplit(".", 1)[-1].lower() or str(row.get("act", ""))


def family(row: dict) -> str:
    """arch/act label of a job; an SAE reading hook_mlp_out is `sae_mlp_out`; a tied CLT or a
    Matryoshka dictionary says so."""
    arch = str(row.get("arch.name") or row.get("arch") or "?")
    if arch == "sae" and "mlp_out" in str(row.get("arch.hook_in", "")):
        arch = "sae_mlp_out"
    if row.get("arch.decoder_tying") not in (None, "none"):
        arch += f" {row['arch.decoder_tying']}"
    if row.get("arch.matryoshka"):
        arch += " matryoshka"
    return f"{arch}/{act_name(row)}"


def knob(row: dict) -> tuple[str, float]:
    """The sparsity knob of the job's activation: k (TopK/BatchTopK), JumpReLU's target L0 (or its
    coefficient, for the l0/tanh penalties), ReLU's L1 coefficient."""
    jumprelu = "act.target_l0" if row.get("act.penalty") == "target" else "act.sparsity_coef"
    key = {"topk": "act.k", "batchtopk": "act.k", "jumprelu": jumprelu, "relu": "act.l1_coef"}.get(
        act_name(row), "act.k")
    return key, number(row.get(key))


def n_layers(row: dict) -> int:
    layers = row.get("arch.layers")
    return len(layers) if isinstance(layers, list) and layers else 1


def parse_args(argv: Sequence[str], usage: str, default_scale: str = "cpu") -> tuple[str, set[str], list[str], list[str]]:
    """`run.py [scale=S] [--flag ...] [override ...] [PATH ...]` -> scale, flags, overrides, paths."""
    flags = {a for a in argv if a.startswith("--")}
    assigns = [a for a in argv if "=" in a and not a.startswith("--")]
    paths = [a for a in argv if "=" not in a and not a.startswith("--")]
    scale = next((a.split("=", 1)[1] for a in assigns if a.startswith("scale=")), default_scale)
    if "--help" in flags:
        print(usage)
        raise SystemExit(0)
    return scale, flags, [a for a in assigns if not a.startswith("scale=")], paths
