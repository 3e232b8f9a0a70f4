"""`python -m nn_decomp.train [overrides]`: train one dictionary; `--multirun` sweeps;
`torchrun --nproc-per-node=N -m nn_decomp.train [overrides]` trains data-parallel (distributed.py).

`train(cfg)` (runtime/training.py) is a plain function (tests and sweeps call it directly); `main`
only adds Hydra and the closing summary. Data comes from the LM (data/store.py) or, with
`data=cache`, from an activation cache (data/cached.py), in which case the LM is never loaded,
nor even imported.
"""
from pathlib import Path

import hydra
from omegaconf import DictConfig

from nn_decomp.config.arch import CHECKPOINT_ONLY
from nn_decomp.runtime.jobs import exit_on_usage_error, is_first_rank
from nn_decomp.runtime.training import train


def run_summary(run_dir: Path, final: dict, arch: str) -> str:
    """What a finished run printed last: where it is, how good it is, and what to run next (export:
    not for a crosscoder or MOLT, which no other format holds)."""
    ckpt = run_dir / "checkpoint"
    minutes, seconds = divmod(round(final.get("wall_time_s", 0)), 60)
    formats = {"sae": "saelens", "clt": "circuit_tracer"}.get(arch, "saelens|circuit_tracer")
    export = [] if arch in CHECKPOINT_ONLY else [
        f"export      python -m nn_decomp.export checkpoint={ckpt} format={formats} out=DIR"]
    return "\n".join([
        f"run dir     {run_dir}",
        f"checkpoint  {ckpt}",
        f"held-out    FVU {final.get('nmse', float('nan')):.4f}  EV {final.get('explained_variance', float('nan')):.4f}  "
        f"L0 {final.get('l0', float('nan')):.1f}  dead {final.get('dead_fraction_eval', float('nan')):.1%}  "
        f"({final.get('tokens_seen', 0):,} tokens, {minutes}m{seconds:02d}s)",
        f"evaluate    python -m nn_decomp.evaluate checkpoint={ckpt}", *export])


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    final = exit_on_usage_error(train, cfg)
    if is_first_rank():
        print(run_summary(Path(cfg.paths.output_dir), final, cfg.arch.name), flush=True)


if __name__ == "__main__":
    main()
