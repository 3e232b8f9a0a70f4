"""exp_008: SAEBench's metrics (absorption, sparse probing, autointerp, core) for SAEs of five families
at two L0s on one SmolLM2 layer, beside SAELens' and sparsify's TopK SAEs trained on the identical
cached rows, all scored by the same SAEBench run (README.md).

    python experiments/exp_008_saebench/run.py [scale=smoke|cpu|gpu] [override ...]
        builds the layer's activation cache if missing, trains the grid and the peers (on the rows of
        our TopK jobs), scores every dictionary (nn_decomp.saebench, one eval at a time: a rerun
        resumes), writes the table and the plots
    ... --no-train           scores and plots what the sweep dir holds
    ... --plot-only          re-plots from the saebench.json files already written
    ... --print-commands     prints the sweep commands and exits
Needs sae-bench's Python (`bash setup_env.sh --with sae-bench`) and the peers (`pip install -e .[bench]`).
"""
import json
import random
import sys
from pathlib import Path

from nn_decomp.analysis.sweeps import Experiment, compose_config, number, pyplot, report_written, save_figure, write_points
from nn_decomp.runtime.sweep_table import collect

NAME = "exp_008_saebench"
LAYER = 2
L0S = {"smoke": [4, 8], "cpu": [16, 64], "gpu": [32, 128]}
L1 = {"smoke": [1, 10], "cpu": [1, 4], "gpu": [1, 4]}  # ReLU's L1 coefficient: its L0 is what it is
SIZES = {"smoke": ["arch.n_latents=256", "train.n_tokens=8192", "train.batch_size=256"],
         "cpu": ["arch.n_latents=2048", "train.n_tokens=1024000", "train.batch_size=1024", "train.eval_every=250",
                 "train.checkpoint_every=250"],
         "gpu": ["arch.n_latents=16384", "train.n_tokens=50000000", "train.batch_size=4096"]}
MATRYOSHKA = {"smoke": "[64,128]", "cpu": "[128,512]", "gpu": "[1024,4096]"}
SCALES = list(L0S)
PEERS = ("saelens_topk", "sparsify_topk")
ABSORPTION_FIRST = ("matryoshka", "batchtopk")  # Matryoshka's claim is against its own base activation
# the SAEBench run's sizes per scale (conf/saebench.yaml's defaults at cpu)
SAEBENCH = {"smoke": ["core_tokens=256", "autointerp_tokens=2048", "autointerp_latents=8", "probe_train_per_class=16",
                      "probe_test_per_class=4", "probe_context_length=32", "probing_sets=[sotu_party]"],
            "cpu": ["core_tokens=4096", "autointerp_tokens=32768"], "gpu": ["llm_batch_size=64"]}
# (column of saebench.json, label, lower is better)
METRICS = [("absorption.mean.mean_absorption_fraction_score", "absorption fraction (first letter)", True),
           ("sparse_probing.sae.sae_top_1_test_accuracy", "sparse probing, top-1 latent accuracy", False),
           ("autointerp.autointerp.autointerp_score", "autointerp score (offline judge)", False),
           ("core.model_performance_preservation.ce_loss_score", "CE loss score", False)]
COLUMNS = ["family", "k", "l0", "explained_variance", "ce_loss_score", "kl_div_score", "absorption", "absorption_lo",
           "absorption_hi", "full_absorption", "probing_top1", "probing_top1_lo", "probing_top1_hi", "probing_top5",
           "llm_probe", "autointerp", "autointerp_lo", "autointerp_hi", "frac_alive", "job"]


def grids(scale: str) -> list[list[str]]:
    sizes, ks = ["arch=sae", f"arch.layers=[{LAYER}]", "data=cache", *SIZES[scale]], ",".join(map(str, L0S[scale]))
    return [[*sizes, "act=topk", f"act.k={ks}"], [*sizes, "act=batchtopk", f"act.k={ks}"],
            [*sizes, "act=jumprelu", f"act.target_l0={ks}"], [*sizes, "act=relu", f"act.l1_coef={','.join(map(str, L1[scale]))}"],
            [*sizes, "act=batchtopk", f"act.k={ks}", f"arch.matryoshka={MATRYOSHKA[scale]}"]]


def build_cache(exp: Experiment) -> None:
    """The layer's residual stream over the text the grid trains on, once (the LM stops after the layer)."""
    from nn_decomp.runtime.jobs import run_cli

    cfg = exp.config("arch=sae", f"arch.layers=[{LAYER}]", *SIZES[exp.scale])
    if Path(cfg.cache.path).exists():
        return
    code = run_cli("nn_decomp.cache", [*exp.base, *exp.overrides, "arch=sae", f"arch.layers=[{LAYER}]", *SIZES[exp.scale]])
    assert code == 0, f"building the cache {cfg.cache.path} failed"


def train_peers(rows: list[dict], peers_dir: Path) -> None:
    """Each peer on the rows of our TopK job at each k, saved as our checkpoint (peers.peer_checkpoint)."""
    from nn_decomp.analysis.peers import train_peer_on_run
    from nn_decomp.runtime.checkpoint import read_config

    for r in rows:
        if r["status"] != "completed" or r.get("act") != "topk" or r.get("arch.matryoshka"):
            continue
        cfg, meta = read_config(Path(r["job_dir"]) / "checkpoint")
        for name in PEERS:
            out = peers_dir / f"{name}_k{cfg.act.k}"
            if not (out / "checkpoint").exists():
                print(f"training {name} on the rows of {r['job']}", flush=True)
                scores = train_peer_on_run(name, cfg, out / "checkpoint", meta)
                (out / "metrics.json").write_text(json.dumps(scores, indent=1))


def score(checkpoints: dict[Path, str], scale: str) -> None:
    """Each eval over every dictionary in one worker, filed before the next starts. Absorption (~3.5 min
    per dictionary on 2 cores once the layer's ground-truth probes exist) runs one dictionary per worker: the families Matryoshka's claim is about
    right after core, the others last, so that a run cut short keeps the comparison."""
    from nn_decomp.interop.saebench import saebench

    def run(paths: list[Path], name: str) -> None:
        listed = f"checkpoints=[{','.join(json.dumps(str(p)) for p in paths)}]"  # quoted: Hydra's grammar
        saebench(compose_config("saebench", [listed, f"evals=[{name}]", *SAEBENCH[scale]]))

    first = [p for p in checkpoints if checkpoints[p] in ABSORPTION_FIRST]
    run(list(checkpoints), "core")
    for path in first:
        run([path], "absorption")
    run(list(checkpoints), "autointerp")
    for path in checkpoints:
        run([path], "absorption")  # a no-op where done
    run(list(checkpoints), "sparse_probing")


def bootstrap(groups: list[list[float]], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of SAEBench's statistic, the mean over groups of each group's mean item (letters or
    latents: one group; sparse probing: each set's one-vs-rest classes), items resampled within groups."""
    groups = [g for g in groups if g]
    if not groups:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(sum(rng.choices(g, k=len(g))) / len(g) for g in groups) / len(groups) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def letters(checkpoint: Path) -> dict[str, float]:
    """Absorption fraction per first letter SAEBench scored (those its ground-truth probe found)."""
    path = checkpoint / "saebench" / "absorption.json"
    details = json.loads(path.read_text())["eval_result_details"] if path.exists() else []
    return {d["first_letter"]: d["mean_absorption_fraction"] for d in details}


def items(checkpoint: Path, name: str) -> list[list[float]]:
    """The eval's items, grouped as SAEBench averages them (bootstrap)."""
    if name == "absorption":
        return [list(letters(checkpoint).values())]
    path = checkpoint / "saebench" / f"{name}.json"
    if not path.exists():
        return []
    result = json.loads(path.read_text())
    if name == "autointerp":
        return [[v["score"] for v in result["eval_result_unstructured"].values() if "score" in v]]
    return [list(per_set["sae_top_1_test_accuracy"].values()) for per_set in result["eval_result_unstructured"].values()]


def family(r: dict, checkpoint: Path) -> str:
    peer = json.loads((checkpoint / "metadata.json").read_text()).get("peer")
    return peer or ("matryoshka" if r.get("arch.matryoshka") else r.get("act", "?"))


def points(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        checkpoint = Path(r["job_dir"]) / "checkpoint"
        s = lambda key: number(r.get(f"saebench.{key}"))  # noqa: E731
        if r["status"] != "completed" or r.get("saebench.core.sparsity.l0") is None:
            continue
        absorption, probing, autointerp = (bootstrap(items(checkpoint, e)) for e in ("absorption", "sparse_probing", "autointerp"))
        out.append({"family": family(r, checkpoint), "k": r.get("act.k") or r.get("act.target_l0") or r.get("act.l1_coef"),
                    "l0": s("core.sparsity.l0"), "explained_variance": s("core.reconstruction_quality.explained_variance"),
                    "ce_loss_score": s("core.model_performance_preservation.ce_loss_score"),
                    "kl_div_score": s("core.model_behavior_preservation.kl_div_score"),
                    "absorption": s("absorption.mean.mean_absorption_fraction_score"), "absorption_lo": absorption[0],
                    "absorption_hi": absorption[1], "full_absorption": s("absorption.mean.mean_full_absorption_score"),
                    "probing_top1": s("sparse_probing.sae.sae_top_1_test_accuracy"), "probing_top1_lo": probing[0],
                    "probing_top1_hi": probing[1], "probing_top5": s("sparse_probing.sae.sae_top_5_test_accuracy"),
                    "llm_probe": s("sparse_probing.llm.llm_test_accuracy"),
                    "autointerp": s("autointerp.autointerp.autointerp_score"), "autointerp_lo": autointerp[0],
                    "autointerp_hi": autointerp[1], "frac_alive": s("core.misc_metrics.frac_alive"), "job": r["job"]})
    return sorted(out, key=lambda p: (p["family"], p["l0"]))


def matryoshka_vs_base(rows: list[dict], out_dir: Path) -> Path:
    """Matryoshka minus its base activation (BatchTopK, same k) in absorption fraction, letter by letter:
    the mean paired difference with its 95% bootstrap interval over the letters both scored."""
    by = {(family(r, r["job_dir"] / "checkpoint"), r.get("act.k")): r["job_dir"] / "checkpoint"
          for r in rows if r["status"] == "completed"}
    out = []
    for (fam, k), checkpoint in sorted(by.items(), key=str):
        if fam != "matryoshka" or ("batchtopk", k) not in by:
            continue
        ours, base = letters(checkpoint), letters(by[("batchtopk", k)])
        common = sorted(ours.keys() & base.keys())
        if common:
            diffs = [ours[x] - base[x] for x in common]
            lo, hi = bootstrap([diffs])
            out.append({"k": k, "letters": len(common), "matryoshka": sum(ours[x] for x in common) / len(common),
                        "batchtopk": sum(base[x] for x in common) / len(common),
                        "difference": sum(diffs) / len(common), "difference_lo": lo, "difference_hi": hi,
                        "letters_lower": sum(d < 0 for d in diffs)})
    return write_points(out, out_dir / "matryoshka_vs_batchtopk.csv", ["k", "letters", "matryoshka", "batchtopk",
                                                                     "difference", "difference_lo", "difference_hi",
                                                                     "letters_lower"])


def plot(pts: list[dict], out_dir: Path) -> list[Path]:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.4))
    axes = axes.ravel()
    l0s = [p["l0"] for p in pts]
    ticks = [t for t in (2 ** i for i in range(1, 10)) if min(l0s) / 1.5 <= t <= max(l0s) * 1.5]
    columns = {"absorption.mean.mean_absorption_fraction_score": "absorption",
               "sparse_probing.sae.sae_top_1_test_accuracy": "probing_top1",
               "autointerp.autointerp.autointerp_score": "autointerp",
               "core.model_performance_preservation.ce_loss_score": "ce_loss_score"}
    for ax, (metric, label, lower_better) in zip(axes, METRICS):
        key = columns[metric]
        for fam in sorted({p["family"] for p in pts}):
            series = [p for p in pts if p["family"] == fam]
            lo = [p[key] - p.get(f"{key}_lo", p[key]) for p in series]
            hi = [p.get(f"{key}_hi", p[key]) - p[key] for p in series]
            ax.errorbar([p["l0"] for p in series], [p[key] for p in series], yerr=[lo, hi], fmt="o-", capsize=3, label=fam)
        ax.set(xscale="log", xlabel="L0 (SAEBench core)", ylabel=label + (" (lower is better)" if lower_better else ""),
               xticks=ticks, xticklabels=[str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SAEBench on SmolLM2 layer {LAYER} (resid_post): ours and peers on the same cached rows")
    return [save_figure(fig, out_dir / "saebench.png"), write_points(pts, out_dir / "saebench.csv", COLUMNS)]


def main(argv: list[str]) -> list[Path]:
    exp, flags, _ = Experiment.from_args(NAME, argv, __doc__, SCALES)
    if "--print-commands" in flags:
        return exp.print_commands(grids(exp.scale))
    peers_dir = exp.sweep_dir.parent / "peers"
    if not flags & {"--plot-only", "--no-train"}:
        build_cache(exp)
        rows = exp.run_sweeps(grids(exp.scale))
        train_peers([r | {"job_dir": exp.sweep_dir / r["job"]} for r in rows], peers_dir)
    rows = [r | {"job_dir": root / r["job"]} for root in (exp.sweep_dir, peers_dir) if root.exists()
            for r in collect(root)]
    if "--plot-only" not in flags:
        score({r["job_dir"] / "checkpoint": family(r, r["job_dir"] / "checkpoint") for r in rows
               if r["status"] == "completed"}, exp.scale)
        rows = [r | {"job_dir": root / r["job"]} for root in (exp.sweep_dir, peers_dir) for r in collect(root)]
    return report_written([*plot(points(rows), exp.out_dir), matryoshka_vs_base(rows, exp.out_dir)])


if __name__ == "__main__":
    main(sys.argv[1:])
