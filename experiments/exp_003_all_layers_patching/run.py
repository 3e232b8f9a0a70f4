"""exp_003: every MLP of a block of layers replaced at once: per-layer transcoders vs one CLT
(README.md).

    python experiments/exp_003_all_layers_patching/run.py [scale=smoke|cpu|gpu] [override ...]
        trains the per-layer transcoders and the CLT for each k, evaluates each as one
        replacement model (nn_decomp.evaluate), plots
    ... --no-train           evaluates (where eval.json is missing) and plots the existing sweep
    ... --plot-only          re-plots from the eval.json files already written
    ... --print-commands     prints the sweep commands and exits
"""
import json
import sys
from pathlib import Path

from nn_decomp.runtime.checkpoint import load_dictionary
from nn_decomp.analysis.evaluation import EVAL_JSON
from nn_decomp.analysis.metrics import REPLACEMENT_METRICS, paired_difference
from nn_decomp.analysis.sweeps import (Experiment, evaluate_checkpoints, evaluation_model, number, pyplot, report_written,
                              save_figure, write_points)

NAME = "exp_003_all_layers_patching"
BLOCKS = {"smoke": [0, 1], "cpu": [0, 1, 2, 3], "cpu_2m": [0, 1, 2, 3], "gpu": list(range(12))}
KS = {"smoke": [8], "cpu": [8, 16, 32], "cpu_2m": [12, 32], "gpu": [16, 32, 64, 128]}
SCALES = list(BLOCKS)  # the scales this experiment has sizes for
COLUMNS = ["family", "k", "layers", "mean_l0_per_module", "active_latents_per_mlp", "active_decoder_params",
           "replacement_ce", "replacement_kl", "replacement_top1_agreement", "replacement_ce_recovered_zero",
           "ce_clean", "replacement_ce_stderr", "replacement_kl_stderr", "ce_minus_transcoders",
           "ce_minus_transcoders_stderr", "kl_minus_transcoders", "kl_minus_transcoders_stderr",
           "top1_agreement_minus_transcoders", "top1_agreement_minus_transcoders_stderr", "n_tokens", "eval_json"]
X_AXES = [("mean_l0_per_module", "mean L0 per module"),
          ("active_latents_per_mlp", "active latents per MLP reconstruction\n(CLT: incl. cross-layer writes)"),
          ("active_decoder_params", "active decoder parameters per token")]
Y_AXES = [("replacement_ce", "CE, all MLPs replaced"), ("replacement_kl", "KL(clean ‖ replaced)")]


def grids(scale: str) -> list[list[str]]:
    block, ks = BLOCKS[scale], ",".join(map(str, KS[scale]))
    per_layer = ",".join(f"[{layer}]" for layer in block)
    clt = ["arch=clt", f"arch.layers=[{','.join(map(str, block))}]", "act=topk"]
    # a CLT whose latents write one vector (scaled per target): the per-layer transcoders' active
    # decoder parameters at their L0 (the largest k)
    tied = [*clt, f"act.k={KS[scale][-1]}", "arch.decoder_tying=per_source", "arch.per_target_scale=true"]
    return [["arch=transcoder", f"arch.layers={per_layer}", "act=topk", f"act.k={ks}"], [*clt, f"act.k={ks}"], tied]


def replacements(rows: list[dict], block: list[int], ks: list[int]) -> list[tuple[str, int, list[Path]]]:
    """(family, k, checkpoints) of each replacement model: the CLT alone, or one transcoder per
    layer of the block (only when every layer's transcoder completed)."""
    done = [r for r in rows if r["status"] == "completed"]
    out = []
    for k in ks:
        for clt in (r for r in done if r.get("arch.name") == "clt" and r.get("act.k") == k):
            tying = clt.get("arch.decoder_tying") or "none"  # absent from runs before tying existed
            out.append(("clt" if tying == "none" else f"clt {tying}", k, [Path(clt["job"])]))
        per_layer = {r["arch.layers"][0]: r for r in done if r.get("arch.name") == "transcoder" and r.get("act.k") == k}
        if sorted(per_layer) == block:
            out.append(("transcoders", k, [Path(per_layer[layer]["job"]) for layer in block]))
    return out


def sparsity_costs(ev: dict, cross_layer: bool, params_per_latent: list[int]) -> dict:
    """From the per-source-layer L0s: active latents that write each MLP's reconstruction (a CLT
    latent of layer i writes every layer j >= i) and the decoder parameters those writes use
    (`SparseCoder.decoder_params`, the same for every latent of a source layer: a tied CLT's latent uses fewer)."""
    l0 = ev["l0_per_layer"]
    n = len(l0)
    writes_into = [sum(l0[: j + 1]) if cross_layer else l0[j] for j in range(n)]
    return {"mean_l0_per_module": sum(l0) / n, "active_latents_per_mlp": sum(writes_into) / n,
            "active_decoder_params": sum(a * p for a, p in zip(l0, params_per_latent))}


def point(family: str, k: int, eval_json: Path, ev: dict) -> dict:
    per_latent = [n for path in ev["checkpoints"] for n in load_dictionary(path).decoder_params()[:, 0].tolist()]
    return {"family": family, "k": k, "layers": ev["layers"], **sparsity_costs(ev, family.startswith("clt"), per_latent),
            **{key: number(ev.get(key)) for key in COLUMNS[6:13]}, "n_tokens": ev["n_tokens"],
            "eval_json": str(eval_json)}


def evaluate_replacements(exp: Experiment, rows: list[dict], scale: str, plot_only: bool) -> list[dict]:
    model, points, evals = None, [], []
    for family, k, jobs in replacements(rows, BLOCKS[scale], KS[scale]):
        ckpts = [exp.sweep_dir / job / "checkpoint" for job in jobs]
        clt = family.startswith("clt")
        out = ckpts[0] if clt else exp.out_dir / "transcoder_sets" / f"k{k}"
        if not (out / EVAL_JSON).exists() and not plot_only:
            model = model or evaluation_model(exp.analysis, ckpts[0])
            evaluate_checkpoints(ckpts, exp.analysis, model, out=None if clt else out)
        if (out / EVAL_JSON).exists():
            evals.append(json.loads((out / EVAL_JSON).read_text()))
            points.append(point(family, k, out / EVAL_JSON, evals[-1]))
    return compared_with_transcoders(points, evals, KS[scale][-1])


def compared_with_transcoders(points: list[dict], evals: list[dict], k: int) -> list[dict]:
    """Each replacement model's CE, KL and top-1 agreement (`evals`: its eval.json) minus the per-layer
    transcoders' at k, token by token on the same contexts, with the context-clustered standard error
    (evaluations written before eval.json had per-context sums are left blank)."""
    base = next((ev for p, ev in zip(points, evals) if p["family"] == "transcoders" and p["k"] == k), None)
    for p, ev in zip(points, evals):
        comparable = base is not None and "per_context" in base and "per_context" in ev
        for m in REPLACEMENT_METRICS:
            diff, se = paired_difference(ev, base, f"replacement_{m}") if comparable else (None, None)
            p[f"{m}_minus_transcoders"], p[f"{m}_minus_transcoders_stderr"] = diff, se
    return points


def plot(points: list[dict], out_dir: Path) -> list[Path]:
    plt = pyplot()
    fig, axes = plt.subplots(len(Y_AXES), len(X_AXES), figsize=(13, 7), squeeze=False)
    for row, (y, y_label) in enumerate(Y_AXES):
        for col, (x, x_label) in enumerate(X_AXES):
            ax = axes[row][col]
            for family in sorted({p["family"] for p in points}):
                series = sorted((p for p in points if p["family"] == family), key=lambda p: p[x])
                ax.errorbar([p[x] for p in series], [p[y] for p in series], yerr=[p[f"{y}_stderr"] for p in series],
                            fmt="o-", capsize=3, label=family)
                for p in series:
                    ax.annotate(f"k={p['k']}", (p[x], p[y]), fontsize=7, textcoords="offset points", xytext=(3, 3))
            if y == "replacement_ce" and points:
                ax.axhline(points[0]["ce_clean"], color="gray", linestyle="--", label="clean LM")
            ax.set(xscale="log", xlabel=x_label, ylabel=y_label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    layers = points[0]["layers"] if points else []
    fig.suptitle(f"all MLPs of layers {layers} replaced at once: per-layer transcoders vs one CLT "
                 "(bars: ± 1 standard error, clustered by context)")
    return [save_figure(fig, out_dir / "all_layers_patching.png"),
            write_points(points, out_dir / "all_layers_patching.csv", COLUMNS)]


def main(argv: list[str]) -> list[Path]:
    exp, flags, _ = Experiment.from_args(NAME, argv, __doc__, SCALES)
    if "--print-commands" in flags:
        return exp.print_commands(grids(exp.scale))
    rows = exp.collect() if flags & {"--plot-only", "--no-train"} else exp.run_sweeps(grids(exp.scale))
    points = evaluate_replacements(exp, rows, exp.scale, "--plot-only" in flags)
    return report_written(plot(points, exp.out_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
