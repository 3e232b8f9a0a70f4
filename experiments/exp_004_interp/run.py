"""exp_004: interpretability report of one trained dictionary (README.md).

    python experiments/exp_004_interp/run.py [scale=smoke|cpu|gpu] [checkpoint=PATH] [override ...]
        trains the experiment's dictionary unless checkpoint=PATH is given (or it already
        exists), then writes dashboard.html, density.png, features.csv, summary.json
Overrides: interp.judge=openai interp.judge_model=... , paths.root_dir=DIR, ...
"""
import sys
from pathlib import Path

from omegaconf import OmegaConf

from nn_decomp.config.experiments import InterpConfig
from nn_decomp.analysis.interp import analyse, load_report_inputs, write_report
from nn_decomp.runtime.jobs import run_cli
from nn_decomp.analysis.sweeps import Experiment, evaluation_model, report_written

NAME = "exp_004_interp"


def main(argv: list[str]) -> list[Path]:
    # checkpoint=PATH is read here, not by Hydra: a path may hold characters its grammar reserves
    # (a sweep dir named before path_safe, a user's dir).
    checkpoint = next((a.split("=", 1)[1] for a in argv if a.startswith("checkpoint=")), None)
    exp, _, _ = Experiment.from_args(NAME, [a for a in argv if not a.startswith("checkpoint=")], __doc__)
    cfg = exp.config()
    interp = OmegaConf.to_container(cfg.interp, resolve=True)  # resolved first: it reads ${analysis...}
    icfg: InterpConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(InterpConfig), interp))
    run_dir = Path(cfg.hydra.run.dir)
    if checkpoint is None:
        checkpoint = run_dir / "checkpoint"
        if not (run_dir / "metrics.json").exists():
            print(f"$ python -m nn_decomp.train {' '.join(exp.base + exp.overrides)}", flush=True)
            assert run_cli("nn_decomp.train", exp.base + exp.overrides, exp.in_process) == 0, "training failed"
    model = evaluation_model(exp.analysis, Path(checkpoint))
    d, contexts, exclude = load_report_inputs(Path(checkpoint), model, icfg.n_tokens)
    report = analyse(model, d, contexts, exclude, icfg)
    written = write_report(report, exp.out_dir, f"{NAME}: {checkpoint}")
    print("\n".join(f"{k}: {v}" for k, v in report.summary.items()))
    return report_written(written)


if __name__ == "__main__":
    main(sys.argv[1:])
