"""exp_005: recovery of planted features, every arch × act, peers on identical batches (README.md).

    python experiments/exp_005_ground_truth/run.py [scale=smoke|cpu|gpu] [override ...]
        runs our sweeps (python -m nn_decomp.train --multirun ... data=synthetic), trains the peers
        on the same rows (when `.[bench]` is installed), scores everything, prints the table, plots
    ... --plot-only          re-scores and re-plots existing jobs (peers: their saved scores)
    ... --print-commands     prints our sweep commands and exits
    ... --no-peers           skips the peers
"""
import importlib.util
import json
import sys
from pathlib import Path

import torch

from nn_decomp.runtime.checkpoint import load_dictionary, read_config
from nn_decomp.core.losses import fvu
from nn_decomp.analysis.sweeps import Experiment, number, pyplot, report_written, save_figure, write_points
from nn_decomp.data.synthetic import SyntheticData, recovery

NAME = "exp_005_ground_truth"
K = 8  # the planted mean L0 is 7: every activation is compared at L0 ≈ 8
SIZES = {
    "smoke": ["arch.n_latents=64", "train.n_tokens=2048", "train.batch_size=256", "train.eval_tokens=512",
              "train.warmup_steps=1", "data.n_features=64", "data.d_in=16", "data.d_out=16", "data.n_parents=4",
              "data.mean_l0=3"],
    # the independent check's setting: 2048 latents, 2000 steps of 1024 fresh rows, lr 1e-3
    "cpu": ["arch.n_latents=2048", "train.n_tokens=2048000", "train.batch_size=1024", "train.eval_tokens=8192",
            "train.eval_every=500", "train.checkpoint_every=1000", "train.log_every=50"],
    "gpu": ["arch.n_latents=4096", "train.n_tokens=40960000", "train.batch_size=4096", "train.eval_tokens=65536",
            "train.eval_every=2000", "train.checkpoint_every=2000", "data.n_features=2048"],
}
SCALES = list(SIZES)  # the scales this experiment has sizes for
# The sparsity dials (README: the tables): JumpReLU's target L0 (its default penalty), and the coefficient
# sweeps that do not dial L0: JumpReLU's tanh penalty with the init that was the default before
# (θ₀ = 3, θ at the base lr, tokens not normalised, as it was measured), ReLU's L1 (plain, and p-annealed).
JUMPRELU_TARGETS = "8,16,32,64,128"
JUMPRELU_TANH = ["act.penalty=tanh", "act.init_threshold=3", "act.threshold_lr_scale=1",
                 "act.sparsity_coef=0.01,0.03,0.1,0.3,1,3,10", "act.token_norm=false"]
RELU_COEFS = "1,3,4,5,6,7,10,30,100"
# ReLU with its penalty annealed from L1 towards L0 over the second half of training (p-annealing,
# Karvonen et al. 2024) and tokens at one norm; and the same with the penalty's weight warmed up from 0
# over the first half, while p is still 1: what gets a ReLU SAE to 0.9 recovery at L0 ≈ 8
RELU_P_END = 0.5
RELU_PANNEAL = ["act.token_norm=true", f"act.p_end={RELU_P_END}", "act.l1_coef=0.5,1,2,2.5,3,4"]
RELU_WARMED = ["act.token_norm=true", f"act.p_end={RELU_P_END}", "act.l1_coef=1,2,3,3.5,4"]
CLT = ["arch=clt", "arch.layers=[0,1,2]"]
MATRYOSHKA = "[128,512]"


def half_of_training(sizes: list[str]) -> str:
    """train.sparsity_warmup_steps over the first half of a scale's steps."""
    size = dict(s.split("=") for s in sizes)
    return f"train.sparsity_warmup_steps={int(size['train.n_tokens']) // int(size['train.batch_size']) // 2}"


def grids(scale: str) -> list[list[str]]:
    sizes = SIZES[scale]
    if scale == "smoke":
        return [[*sizes, "arch=sae,transcoder", "act=topk,batchtopk", "act.k=2"],
                [*sizes, "arch=sae", "act=batchtopk", "act.k=2", "arch.matryoshka=[8,32]"],
                [*sizes, "arch=sae", "act=jumprelu,relu"], [*sizes, *CLT, "act=batchtopk", "act.k=2"],
                [*sizes, "arch=sae", "act=relu", f"act.p_end={RELU_P_END}", half_of_training(sizes)]]
    return [[*sizes, "arch=sae,transcoder,skip_transcoder", "act=topk,batchtopk", f"act.k={K}"],
            # the token normalisation BatchTopK needs (activations.BatchTopK), off; and on for TopK
            [*sizes, "arch=sae", "act=batchtopk", f"act.k={K}", "act.token_norm=false"],
            [*sizes, "arch=sae", "act=topk", f"act.k={K}", "act.token_norm=true"],
            # a per-latent θ fixed across tokens needs them at one norm (JumpReLU's default on an SAE, as
            # BatchTopK's threshold does); and without it
            [*sizes, "arch=sae", "act=jumprelu", f"act.target_l0={JUMPRELU_TARGETS}"],
            [*sizes, "arch=sae", "act=jumprelu", f"act.target_l0={JUMPRELU_TARGETS}", "act.token_norm=false"],
            [*sizes, "arch=sae", "act=jumprelu", *JUMPRELU_TANH],
            [*sizes, "arch=sae", "act=relu", f"act.l1_coef={RELU_COEFS}"],
            [*sizes, "arch=sae", "act=relu", *RELU_PANNEAL],
            [*sizes, "arch=sae", "act=relu", *RELU_WARMED, half_of_training(sizes)],
            [*sizes, *CLT, "act=topk,batchtopk", f"act.k={K}"],
            # Matryoshka: nested prefixes of 128 and 512 of the 2048 latents (the 64 parents fit the first)
            [*sizes, "arch=sae", "act=topk,batchtopk", f"act.k={K}", f"arch.matryoshka={MATRYOSHKA}"]]


COLUMNS = ["run", "arch", "act", "knob", "mean_max_cos", "frac_above_0.9", "max_cos_frequent", "max_cos_middle",
           "max_cos_rare", "absorption", "l0", "fvu"]


@torch.no_grad()
def score(decoders: list[torch.Tensor], latents_BLF: torch.Tensor, recon_BLD: torch.Tensor,
          data: SyntheticData, eval_rows) -> dict:
    _, y, draw = eval_rows
    return {**recovery(decoders, data.truth, latents_BLF, draw.dense()), "l0": (latents_BLF != 0).float().sum(-1).mean().item(),
            "fvu": fvu(recon_BLD, y).mean().item()}


@torch.no_grad()
def score_job(job: Path) -> dict:
    """Our checkpoint on the job's own held-out rows: eval mode, as a user loads it."""
    cfg, _ = read_config(job / "checkpoint")
    coder = load_dictionary(job / "checkpoint")
    data = SyntheticData.for_run(cfg, "cpu")
    rows = data.eval_rows(cfg.train.eval_tokens)
    out = coder(rows[0])
    act = type(coder.activation).__name__
    # token normalisation as resolved (JumpReLU's null: on for an SAE), named for TopK where it differs
    # from the activation's default (BatchTopK: on) and for JumpReLU / ReLU wherever it is on
    on = coder.activation.token_norm
    token_norm = "" if on == (act == "BatchTopK") else f" token_norm={on}"
    normed = "token_norm " if on and act in ("JumpReLU", "ReLU") else ""
    p_end = cfg.act.get("p_end", 1.0)  # ReLU's; absent from runs older than the key
    warmup = f"warmup={cfg.train.sparsity_warmup_steps} " if cfg.train.get("sparsity_warmup_steps") else ""
    matryoshka = f" matryoshka={list(cfg.arch.matryoshka)}" if cfg.arch.get("matryoshka") else ""
    topk = f"k={cfg.act.get('k')}{token_norm}{matryoshka}"
    knob = {"TopK": topk, "BatchTopK": topk,
            "JumpReLU": normed + (f"target={cfg.act.get('target_l0')}" if cfg.act.get("penalty") == "target"
                                  else f"{cfg.act.get('penalty')} coef={cfg.act.get('sparsity_coef')}"),
            "ReLU": normed + (f"p_end={p_end} " if p_end < 1 else "") + warmup + f"l1={cfg.act.get('l1_coef')}"}
    return {"run": f"ours {cfg.arch.name} {act} {knob[act]}", "arch": cfg.arch.name, "act": act.lower(),
            "knob": knob[act], "config": cfg,
            **score([w.flatten(1) for w in coder.W_dec], out.latents.dense(), out.recon, data, rows)}


def run_peers(jobs: list[dict], out: Path) -> list[dict]:
    """Each peer on the rows of our TopK job of its task (same config, same stream); scores saved to
    `out` so that --plot-only need not retrain."""
    from nn_decomp.analysis.peers import build_peer, train_peer

    done = json.loads(out.read_text()) if out.exists() else []
    installed = [p for p in ("saelens", "sparsify") if importlib.util.find_spec({"saelens": "sae_lens"}.get(p, p))]
    if len(installed) < 2:
        print(f"peers: only {installed} installed (pip install -e .[bench] for both)", flush=True)
    todo = [(j, name) for j in jobs if j["act"] == "topk" and not any(w in j["knob"] for w in ("token_norm", "matryoshka"))
            for name in {"sae": ["saelens_topk", "saelens_batchtopk", "sparsify_topk"],
                         "transcoder": ["sparsify_topk"]}.get(j["arch"], []) if name.split("_")[0] in installed]
    for job, name in todo:
        run = f"{name.replace('_', ' ')} {job['arch']} {job['knob']}"
        if any(r["run"] == run for r in done):
            continue
        cfg = job["config"]
        torch.manual_seed(cfg.train.seed)
        data = SyntheticData.for_run(cfg, "cpu")
        peer = build_peer(name, cfg.data.d_in, cfg.arch.n_latents, cfg.act.k, job["arch"] != "sae")
        print(f"training {run}", flush=True)
        train_peer(peer, data.next_batch, cfg.train, cfg.arch.n_latents)
        rows = data.eval_rows(cfg.train.eval_tokens)
        x = rows[0][:, 0]
        done.append({"run": run, "arch": job["arch"], "act": name, "knob": job["knob"],
                     **score([peer.decoder()], peer.latents(x)[:, None], peer.reconstruct(x)[:, None], data, rows)})
        out.write_text(json.dumps(done, indent=2))
    return done


def table(results: list[dict]) -> str:
    head = ["run", "mean max-cos", "frac > 0.9", "frequent", "middle", "rarest third", "absorption", "L0", "FVU"]
    keys = COLUMNS[4:]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([r["run"], *(f"{number(r[k]):.3f}" if k != "l0" else f"{number(r[k]):.1f}"
                                            for k in keys)]) + " |" for r in results]
    return "\n".join(lines)


def plot(results: list[dict], out_dir: Path) -> list[Path]:
    plt = pyplot()
    fig, (ax_cos, ax_l0) = plt.subplots(1, 2, figsize=(13, 0.28 * len(results) + 2))
    names = [r["run"] for r in results]
    for i, (tercile, colour) in enumerate(zip(("frequent", "middle", "rare"), ("C0", "C1", "C3"))):
        ax_cos.barh([j + 0.27 * (i - 1) for j in range(len(results))], [r[f"max_cos_{tercile}"] for r in results],
                    height=0.27, color=colour, label=f"{tercile} third")
    ax_cos.scatter([r["mean_max_cos"] for r in results], range(len(results)), color="k", zorder=3, s=12, label="mean")
    ax_cos.set(yticks=range(len(results)), yticklabels=names, xlim=(0, 1), xlabel="max cosine with a decoder row",
               title="recovery of the planted features")
    ax_cos.axvline(0.9, color="grey", ls=":")
    ax_cos.legend(fontsize=7, loc="lower left")
    ax_cos.invert_yaxis()
    for act, dial, label in (("jumprelu", "token_norm target=", "JumpReLU act.target_l0 (default: token_norm)"),
                             ("jumprelu", "target=", "JumpReLU act.target_l0, act.token_norm=false"),
                             ("jumprelu", "tanh coef=", "JumpReLU tanh act.sparsity_coef (θ₀ = 3)"),
                             ("relu", "l1=", "ReLU act.l1_coef"),
                             ("relu", f"token_norm p_end={RELU_P_END} l1=",
                              f"ReLU act.l1_coef, p annealed to {RELU_P_END}, token_norm"),
                             ("relu", f"token_norm p_end={RELU_P_END} warmup=",
                              "the same, penalty warmed up over the first half")):
        sweep = sorted((r for r in results if r["act"] == act and r["arch"] == "sae" and r["knob"].startswith(dial)),
                       key=coef)
        ax_l0.plot([coef(r) for r in sweep], [r["l0"] for r in sweep], "o-", label=label)
    ax_l0.plot([8, 128], [8, 128], color="grey", ls=":", label="L0 = target")
    ax_l0.set(xscale="log", yscale="log", xlabel="the knob: target L0, or coefficient", ylabel="L0 (held out)",
              title="knob → L0 (SAE)")
    ax_l0.legend(fontsize=8)
    ax_l0.grid(alpha=0.3)
    return [save_figure(fig, out_dir / "ground_truth.png"), write_points(results, out_dir / "ground_truth.csv", COLUMNS)]


def coef(row: dict) -> float:
    return number(row["knob"].split("=")[-1])


def at_target_l0(results: list[dict]) -> list[dict]:
    """The headline rows: every fixed-k run, and for each sweep (its knob's name: target, token_norm
    target, tanh coef, l1, …) the run nearest L0 = K."""
    picked = [r for r in results if r["act"] not in ("jumprelu", "relu")]
    family = lambda r: (r["arch"], r["act"], r["knob"].rsplit("=", 1)[0])  # noqa: E731
    for key in sorted({family(r) for r in results if r["act"] in ("jumprelu", "relu")}):
        sweep = [r for r in results if family(r) == key]
        picked.append(min(sweep, key=lambda r: abs(r["l0"] - K)))
    return picked


def main(argv: list[str]) -> list:
    exp, flags, _ = Experiment.from_args(NAME, argv, __doc__, SCALES)
    if "--print-commands" in flags:
        return exp.print_commands(grids(exp.scale))
    rows = exp.collect() if "--plot-only" in flags else exp.run_sweeps(grids(exp.scale))
    jobs = [score_job(exp.sweep_dir / r["job"]) for r in rows if r["status"] == "completed"]
    peers = [] if "--no-peers" in flags else run_peers(jobs, exp.out_dir / "peers.json")
    results = [{k: v for k, v in r.items() if k != "config"} for r in jobs] + peers
    print("\nAt L0 ≈ 8 (coefficient sweeps: the run nearest it):\n" + table(at_target_l0(results)))
    print("\nEvery run:\n" + table(results))
    return report_written(plot(results, exp.out_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
