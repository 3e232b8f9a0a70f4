"""exp_006: an acausal crosscoder over the residual stream of a block of layers vs one SAE per
layer with the same total latents and the same total L0 (README.md).

    python experiments/exp_006_crosscoder/run.py [scale=smoke|cpu_2m|gpu] [override ...]
        trains the crosscoder(s) and the per-layer SAEs, evaluates each (nn_decomp.evaluate), plots
    ... --no-train           evaluates (where eval.json is missing) and plots the existing sweep
    ... --plot-only          re-plots from the eval.json files already written
    ... --print-commands     prints the sweep commands and exits
"""
import sys
from pathlib import Path

from nn_decomp.analysis.sweeps import Experiment, evaluate_jobs, number, pyplot, report_written, save_figure, write_points

NAME = "exp_006_crosscoder"
BLOCKS = {"smoke": [0, 1], "cpu_2m": [0, 1, 2, 3], "gpu": [4, 5, 6, 7, 8, 9]}
SAE_K = {"smoke": 4, "cpu_2m": 8, "gpu": 32}  # per layer; the crosscoder's k is this × layers (and half that)
SAE_LATENTS = {"smoke": 128, "cpu_2m": 2048, "gpu": 16384}
# cpu_2m trains from a cache of the four residual streams (1.1M rows; build it once, README)
DATA = {"cpu_2m": ["data.path=${paths.cache_dir}/activations/${model.name}_crosscoder_L0-1-2-3.h5",
                   "train.n_tokens=1024000"]}
SCALES = list(BLOCKS)
COLUMNS = ["family", "k", "layer", "l0", "nmse", "ce_recovered_zero", "kl_spliced", "ce_clean", "active_decoder_parameters",
           "replacement_ce", "job"]


def grids(scale: str) -> list[list[str]]:
    block, k, n = BLOCKS[scale], SAE_K[scale], SAE_LATENTS[scale]
    L, data = len(block), DATA.get(scale, [])
    crosscoder = ["arch=crosscoder", f"arch.layers=[{','.join(map(str, block))}]", "act=topk",
                  f"act.k={k * L // 2},{k * L}", f"arch.n_latents={n * L}", *data]
    saes = ["arch=sae", f"arch.layers={','.join(f'[{layer}]' for layer in block)}", "act=topk", f"act.k={k}",
            f"arch.n_latents={n}", *data]
    return [crosscoder, saes]


def points(rows: list[dict]) -> list[dict]:
    """One point per (dictionary, layer): a crosscoder's reconstruction and splice of each layer it
    covers (encoded from every layer's clean activations), an SAE's of its own layer. l0: the whole
    dictionary's (a crosscoder latent writes every layer)."""
    out = []
    for r in rows:
        if r["status"] != "completed" or r.get("eval.nmse") is None:
            continue
        family = "crosscoder" if r.get("arch.name") == "crosscoder" else "SAE per layer"
        for j, layer in enumerate(r["eval.layers"]):
            out.append({"family": family, "k": r["act.k"], "layer": layer, "l0": number(r["eval.l0"]),
                        "nmse": r["eval.nmse_per_layer"][j], "ce_recovered_zero": r["eval.ce_recovered_zero_per_layer"][j],
                        "kl_spliced": r["eval.kl_spliced_per_layer"][j], "ce_clean": number(r["eval.ce_clean"]),
                        "active_decoder_parameters": number(r["eval.active_decoder_parameters"]),
                        "replacement_ce": number(r["eval.replacement_ce"]), "job": r["job"]})
    return out


def plot(pts: list[dict], out_dir: Path) -> list[Path]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, label) in zip(axes, [("nmse", "NMSE (FVU) of the layer"), ("ce_recovered_zero",
                                                                              "CE recovered, this layer spliced")]):
        for family, k in sorted({(p["family"], p["k"]) for p in pts}):
            series = sorted((p for p in pts if (p["family"], p["k"]) == (family, k)), key=lambda p: p["layer"])
            total_l0 = series[0]["l0"] if family == "crosscoder" else sum(p["l0"] for p in series)
            ax.plot([p["layer"] for p in series], [p[key] for p in series], "o-",
                    label=f"{family} k={k} (total L0 {total_l0:.0f})")
        ax.set(xlabel="layer (residual stream after the block)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("one crosscoder over the residual stream vs one SAE per layer (same total latents)")
    return [save_figure(fig, out_dir / "crosscoder.png"), write_points(pts, out_dir / "crosscoder.csv", COLUMNS)]


def main(argv: list[str]) -> list[Path]:
    exp, flags, _ = Experiment.from_args(NAME, argv, __doc__, SCALES)
    if "--print-commands" in flags:
        return exp.print_commands(grids(exp.scale))
    rows = exp.collect() if flags & {"--plot-only", "--no-train"} else exp.run_sweeps(grids(exp.scale))
    if "--plot-only" not in flags:
        rows = evaluate_jobs(rows, exp.sweep_dir, exp.analysis)
    return report_written(plot(points(rows), exp.out_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
