"""exp_002: Pareto fronts of L0 vs NMSE and L0 vs CE loss recovered, per arch x act (README.md).

    python experiments/exp_002_pareto/run.py [scale=smoke|cpu|gpu] [override ...]
        runs the sweeps below, evaluates every checkpoint (nn_decomp.evaluate), collects, plots
    ... --plot-only              re-collects and re-plots (no training, no evaluation)
    ... --no-train SWEEP_DIR ... evaluates + plots existing sweep dirs instead (e.g. exp_001's)
    ... --print-commands         prints the sweep commands and exits
    ... --peers                  also trains the peers on the rows of our TopK k=32 jobs (PEERS;
                                 needs `pip install -e .[bench]`) into peers.json, and plots them
"""
import json
import sys
from pathlib import Path

from nn_decomp.analysis.sweeps import (Experiment, evaluate_jobs, family, knob, n_layers, number, pareto_front, pyplot,
                              report_written, save_figure, write_points)
from nn_decomp.runtime.sweep_table import collect, write_table

NAME = "exp_002_pareto"
GRIDS = {
    "smoke": [["arch=transcoder,clt", "act=topk", "act.k=8,16"]],
    "cpu": [["arch=transcoder,clt", "act=topk", "act.k=8,16,32"]],
    # the findings scale: whole-sotu cache, 2M tokens per dictionary (README: which of these have run)
    "cpu_2m": [["arch=transcoder,skip_transcoder,sae_mlp_out", "act=topk", "act.k=8,16,32,64"],
               ["arch=transcoder,skip_transcoder,sae_mlp_out", "act=batchtopk", "act.k=32"],
               ["arch=transcoder,skip_transcoder,sae_mlp_out", "act=jumprelu", "act.target_l0=32"],
               ["arch=transcoder", "act=batchtopk", "act.k=32", "arch.matryoshka=[128,512]"],
               # MOLT: 120 transforms of ranks 64/32/16/8 (counts 8/16/32/64), the parameters of a 2048-latent transcoder
               ["arch=molt", "act=topk", "act.k=4,8,16", "arch.n_latents=120"]],
    "gpu": [["arch=transcoder,skip_transcoder,clt", "act=topk,batchtopk", "act.k=16,32,64,128"],
            ["arch=transcoder,skip_transcoder,clt", "act=jumprelu", "act.target_l0=16,32,64,128"],
            ["arch=molt", "act=topk", "act.k=4,8,16,32", "arch.n_latents=960"]],  # a 16384-latent transcoder's parameters
}
SCALES = list(GRIDS)  # the scales this experiment has sizes for
# Peer parity: each peer on the identical cache rows, token budget, latents, k and lr schedule as our job.
PEERS = {"transcoder": ["sparsify_topk"], "sae_mlp_out": ["saelens_topk", "sparsify_topk"]}
PEER_K = 32
COLUMNS = ["job", "status", "family", "knob", "knob_value", "l0_per_layer", "nmse", "ce_recovered_zero",
           "ce_recovered_mean", "kl_spliced", "ce_clean", "ce_spliced", "replacement_ce_recovered_zero",
           "active_decoder_parameters", "n_eval_tokens"]
# (x, y, y label, lower y is better). Active decoder parameters per token put a MOLT (a latent applies
# a rank-r map: r·(d_in + d_out) parameters) on one axis with transcoders (a latent writes d_out).
PANELS = [("l0_per_layer", "nmse", "NMSE (held-out, mean over layers)", True),
          ("l0_per_layer", "ce_recovered_zero", "CE loss recovered (vs zero ablation)", False),
          ("active_decoder_parameters", "nmse", "NMSE (held-out, mean over layers)", True)]
X_LABELS = {"l0_per_layer": "L0 per layer", "active_decoder_parameters": "active decoder parameters per token"}


def points(rows: list[dict]) -> list[dict]:
    """Per job: L0 per covered layer and the evaluator's metrics. A CLT's CE recovered is the mean
    over its layers of splicing that one layer (its features from every earlier layer included);
    replacement_* patches all its layers at once."""
    out = []
    for r in rows:
        name, value = knob(r)
        ev = lambda key: number(r.get(f"eval.{key}"))  # noqa: E731
        l0 = ev("l0") if r.get("eval.l0") is not None else number(r.get("l0"))
        out.append({"job": r["job"], "status": r["status"], "family": family(r), "knob": name, "knob_value": value,
                    "l0_per_layer": l0 / n_layers(r),
                    "nmse": ev("nmse") if r.get("eval.nmse") is not None else number(r.get("nmse")),
                    **{k: ev(k) for k in COLUMNS[7:-1]}, "n_eval_tokens": ev("n_tokens")})
    return out


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    pts = [p for p in points(rows) if p["status"] == "completed"]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(16, 4.2))
    for ax, (x_key, key, label, lower_is_better) in zip(axes, PANELS):
        for i, fam in enumerate(sorted({p["family"] for p in pts})):
            xy = [(p[x_key], p[key]) for p in pts if p["family"] == fam and p[key] == p[key] and p[x_key] == p[x_key]]
            if not xy:
                continue
            color = f"C{i}"
            ax.scatter(*zip(*xy), color=color, alpha=0.4, s=18)
            ax.plot(*zip(*pareto_front(xy, lower_is_better)), "o-", color=color, label=fam)
        ax.set(xscale="log", xlabel=X_LABELS[x_key], ylabel=label, title=f"Pareto front: {key}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return [save_figure(fig, out_dir / "pareto.png"), write_points(points(rows), out_dir / "pareto.csv", COLUMNS)]


def run_peers(rows: list[dict], out: Path) -> list[dict]:
    """Each peer of PEERS trained on its TopK k=PEER_K job's rows (nn_decomp.analysis.peers.train_peer_on_run);
    results kept in `out`, so a re-run trains only what is missing."""
    from nn_decomp.runtime.checkpoint import read_config
    from nn_decomp.analysis.peers import train_peer_on_run

    done = json.loads(out.read_text()) if out.exists() else []
    for r in rows:
        if r["status"] != "completed" or r.get("act") != "topk" or r.get("act.k") != PEER_K:
            continue
        for name in PEERS.get(r.get("arch"), []):  # the arch config chosen (sae_mlp_out's arch.name is sae)
            if any(d["peer"] == name and d["arch"] == r["arch"] for d in done):
                continue
            print(f"training {name} on the rows of {r['job']}", flush=True)
            cfg, _ = read_config(Path(r["job"]) / "checkpoint")
            done.append({"peer": name, "arch": r["arch"], "k": PEER_K, "ours_job": str(r["job"]),
                         # the run's own held-out cache rows (metrics.json), the rows the peer is scored on
                         "ours_nmse": number(r.get("nmse")), "ours_l0": number(r.get("l0")),
                         **train_peer_on_run(name, cfg)})
            out.write_text(json.dumps(done, indent=2))
    return done


def main(argv: list[str]) -> list[Path]:
    exp, flags, sweep_dirs = Experiment.from_args(NAME, argv, __doc__, SCALES)
    if "--print-commands" in flags:
        return exp.print_commands(GRIDS[exp.scale])
    if "--no-train" not in flags:
        sweep_dirs = [exp.sweep_dir]
        if "--plot-only" not in flags:
            exp.run_sweeps(GRIDS[exp.scale])
    # every row's job as a path from here; --no-train: evaluate and plot sweeps that already exist
    rows = [row | {"job": str(Path(d) / row["job"])} for d in sweep_dirs
            for row in (collect(d) if "--plot-only" in flags else evaluate_jobs(collect(d), Path(d), exp.analysis))]
    write_table(rows, exp.out_dir / "runs.csv")
    if "--peers" in flags:
        print(json.dumps(run_peers(rows, exp.out_dir / "peers.json"), indent=2))
    return report_written(plot(rows, exp.out_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
