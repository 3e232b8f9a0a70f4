"""exp_001: L0 sweeps of every architecture (README.md).

    python experiments/exp_001_l0_sweep/run.py [scale=smoke|cpu|gpu] [override ...]
        runs the sweeps below (python -m nn_decomp.train --multirun ...), collects, plots
    ... --plot-only          re-collects and re-plots an existing sweep dir
    ... --print-commands     prints the sweep commands and exits

Overrides go to every job (paths.root_dir=DIR, hydra/launcher=slurm_gpu hydra.launcher.partition=..).
"""
import sys

from nn_decomp.analysis.sweeps import (Experiment, family, knob, n_layers, number, pyplot, report_written, save_figure,
                              write_points)

NAME = "exp_001_l0_sweep"
FULL = [
    ["arch=transcoder,skip_transcoder,clt,sae_mlp_out", "act=topk", "act.k=8,16,32,64"],
    # JumpReLU's dial is its target L0 (the default penalty), as TopK's is k
    ["arch=transcoder", "act=jumprelu", "act.target_l0=8,16,32,64"],
    ["arch=transcoder", "act=relu", "act.l1_coef=0.3,1,3,10,30"],
]
GRIDS = {
    "smoke": [["arch=transcoder,sae_mlp_out", "act=topk", "act.k=8"],  # exp_003's smoke trains a CLT
              ["arch=transcoder", "act=jumprelu", "act.target_l0=8,32"]],
    "cpu": FULL,
    "gpu": FULL,
}
SCALES = list(GRIDS)  # the scales this experiment has sizes for
COLUMNS = ["job", "status", "family", "knob", "knob_value", "l0_per_layer", "nmse", "explained_variance"]


def points(rows: list[dict]) -> list[dict]:
    """One point per job: L0 per covered layer (a CLT's sum over its layers / their number) and
    NMSE (mean over layers), from the job's own held-out eval (metrics.json)."""
    out = []
    for r in rows:
        name, value = knob(r)
        out.append({"job": r["job"], "status": r["status"], "family": family(r), "knob": name, "knob_value": value,
                    "l0_per_layer": number(r.get("l0")) / n_layers(r), "nmse": number(r.get("nmse")),
                    "explained_variance": number(r.get("explained_variance"))})
    return out


def plot(rows: list[dict], out_dir) -> list:
    pts = [p for p in points(rows) if p["status"] == "completed"]
    plt = pyplot()
    fig, (ax_front, ax_knob) = plt.subplots(1, 2, figsize=(11, 4.2))
    for fam in sorted({p["family"] for p in pts}):
        series = sorted((p for p in pts if p["family"] == fam), key=lambda p: p["l0_per_layer"])
        ax_front.plot([p["l0_per_layer"] for p in series], [p["nmse"] for p in series], "o-", label=fam)
        for p in series:
            ax_front.annotate(f"{p['knob_value']:g}", (p["l0_per_layer"], p["nmse"]), fontsize=7,
                              textcoords="offset points", xytext=(3, 3))
        if series[0]["knob"] != "act.k":  # a coefficient: which L0 does it land on?
            by_coef = sorted(series, key=lambda p: p["knob_value"])
            ax_knob.plot([p["knob_value"] for p in by_coef], [p["l0_per_layer"] for p in by_coef], "o-",
                         label=f"{fam} ({series[0]['knob']})")
    ax_front.set(xscale="log", xlabel="L0 per layer (active latents per token)", ylabel="NMSE (held-out)",
                 title="reconstruction vs sparsity (labels: k or coefficient)")
    ax_knob.set(xscale="log", yscale="log", xlabel="sparsity coefficient", ylabel="L0 per layer",
                title="sparsity coefficient → L0")
    for ax in (ax_front, ax_knob):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return [save_figure(fig, out_dir / "l0_sweep.png"), write_points(points(rows), out_dir / "l0_sweep.csv", COLUMNS)]


def main(argv: list[str]) -> list:
    exp, flags, _ = Experiment.from_args(NAME, argv, __doc__, SCALES)
    if "--print-commands" in flags:
        return exp.print_commands(GRIDS[exp.scale])
    rows = exp.collect() if "--plot-only" in flags else exp.run_sweeps(GRIDS[exp.scale])
    return report_written(plot(rows, exp.out_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
