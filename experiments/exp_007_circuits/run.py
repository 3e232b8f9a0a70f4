"""exp_007: full-depth replacement models of SmolLM2 and attribution graphs through them (README.md).

    python experiments/exp_007_circuits/run.py [scale=full_depth_cpu|full_depth_gpu] [override ...]
        trains every family (the cache must exist: --print-commands shows how to build it),
        converts each to JumpReLU (one LM pass per set), attributes prompts.txt through each
        (python -m nn_decomp.attribute), writes the findings table and plots
    ... --no-train           skips training (converts, attributes and tabulates what exists)
    ... --table-only         tabulates and plots the attribution summaries already written
    ... --output-shares      where each MLP's output goes on the prompts: features, skip, error (README)
    ... --print-commands     prints the cache and sweep commands and exits
    ... --write-prompts      rewrites prompts.txt from the held-out split (committed; see README)
"""
import json
import random
import re
import shlex
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nn_decomp.analysis.conversion import convert, converted_path
from nn_decomp.analysis.metrics import mean_stderr
from nn_decomp.analysis.sweeps import Experiment, compose_config, pyplot, report_written, save_figure, write_points
from nn_decomp.dictionaries import load_dictionaries
from nn_decomp.interop.attribution import attribute, column, read_prompts
from nn_decomp.models import load_model
from nn_decomp.runtime.checkpoint import read_config

NAME = "exp_007_circuits"
HERE = Path(__file__).parent
PROMPTS = HERE / "prompts.txt"
N_LAYERS = 30
K = {"full_depth_cpu": 16, "full_depth_gpu": 64}
SCALES = list(K)
ALL_LAYERS = f"[{','.join(map(str, range(N_LAYERS)))}]"
# a CLT latent of layer i writes 30 − i layers: Σ = 465 decoder vectors for 30 per-layer ones, so at
# equal active decoder parameters per token its k is the transcoders' · 30 / 465
PARAMS_K = {scale: max(1, round(k * N_LAYERS / 465)) for scale, k in K.items()}
FAMILIES = ("transcoders", "skip transcoders", "clt", "clt per_source", "clt matched params")
CLASSIC = ["The capital of France is", "The Eiffel Tower is in the city of", "The opposite of hot is",
           "The keys to the cabinet", "The author of the books", "One, two, three, four,",
           "Monday, Tuesday, Wednesday,", "January, February, March,"]
N_HELDOUT_PROMPTS = 28


def grids(scale: str) -> list[list[str]]:
    k, per_layer = K[scale], ",".join(f"[{layer}]" for layer in range(N_LAYERS))
    clt = ["arch=clt", f"arch.layers={ALL_LAYERS}"]
    return [["arch=transcoder,skip_transcoder", f"arch.layers={per_layer}", f"act.k={k}"],
            [*clt, f"act.k={k},{PARAMS_K[scale]}"],
            [*clt, f"act.k={k}", "arch.decoder_tying=per_source", "arch.per_target_scale=true"]]


def cache_command(exp: Experiment) -> str:
    """The cache a data=cache scale reads: twice the tokens a dictionary trains on (room for a longer run)."""
    cfg = exp.config("arch=clt", f"arch.layers={ALL_LAYERS}", "data=sotu")
    return ("python -m nn_decomp.cache data=sotu arch=clt " + shlex.quote(f"arch.layers={ALL_LAYERS}") +
            f" cache.n_tokens={2 * cfg.train.n_tokens} train.eval_tokens={cfg.train.eval_tokens}")


def family_sets(rows: list[dict], sweep_dir: Path, scale: str) -> dict[str, list[Path]]:
    """Each family's checkpoints (a full set only: every layer's transcoder completed)."""
    done = [r for r in rows if r["status"] == "completed"]
    sets = {}
    for name, arch in (("transcoders", "transcoder"), ("skip transcoders", "skip_transcoder")):
        per_layer = {r["arch.layers"][0]: sweep_dir / r["job"] for r in done if r.get("arch.name") == arch}
        if sorted(per_layer) == list(range(N_LAYERS)):
            sets[name] = [per_layer[layer] / "checkpoint" for layer in range(N_LAYERS)]
    for r in (r for r in done if r.get("arch.name") == "clt"):
        tied = (r.get("arch.decoder_tying") or "none") != "none"
        name = "clt per_source" if tied else ("clt" if r.get("act.k") == K[scale] else "clt matched params")
        sets[name] = [sweep_dir / r["job"] / "checkpoint"]
    return sets


def converted(checkpoints: list[Path]) -> list[Path]:
    """The JumpReLU twins (what circuit-tracer runs), converted as one set where missing."""
    out = [converted_path(c) for c in checkpoints]
    missing = [c for c, o in zip(checkpoints, out) if not o.exists()]
    if missing:
        convert(OmegaConf.merge(compose_config("convert", ["device=cpu"]), {"checkpoints": [str(c) for c in missing]}))
    return out


def attribution_dir(exp: Experiment, family: str) -> Path:
    return exp.out_dir / "attribution" / family.replace(" ", "_")


def attribute_family(exp: Experiment, family: str, checkpoints: list[Path]) -> None:
    cfg = compose_config("attribute", [f"prompts={PROMPTS}", f"out={attribution_dir(exp, family)}", "device=cpu"])
    attribute(OmegaConf.merge(cfg, {"checkpoints": [str(c) for c in converted(checkpoints)]}))


def l0_per_layer(checkpoints: list[Path]) -> float:
    """The converted set's mean L0 per layer on the conversion's held-out tokens."""
    l0s = [read_config(converted_path(c))[1]["eval"]["l0"] for c in checkpoints]
    return sum(l0s) / (len(l0s) if len(checkpoints) > 1 else N_LAYERS)


PAIRED = ["replacement", "completeness", "pruned.replacement", "pruned.completeness", "at_completeness.nodes",
          "at_completeness.edges", "pruned.nodes", "pruned.edges", "pruned.error_node_share", "cancellation.features",
          "cancellation.logits", "replacement_kl", "replacement_ce"]


def table(exp: Experiment, sets: dict[str, list[Path]]) -> list[dict]:
    """One row per family: mean ± SE over prompts, and the paired difference with the transcoders."""
    results = {}
    for family in sets:
        folder = attribution_dir(exp, family) / "prompts"
        if folder.is_dir():
            results[family] = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    base = results.get("transcoders", {})
    rows = []
    for family, per_prompt in results.items():
        row = {"family": family, "n_prompts": len(per_prompt), "l0_per_layer": l0_per_layer(sets[family])}
        for key in PAIRED:
            s = mean_stderr([column(r, key) for r in per_prompt.values()])
            row[key], row[f"{key}_stderr"] = s["mean"], s["stderr"]
            shared = [p for p in per_prompt if p in base]
            d = mean_stderr([column(per_prompt[p], key) - column(base[p], key) for p in shared])
            row[f"{key}_minus_transcoders"], row[f"{key}_minus_transcoders_stderr"] = d["mean"], d["stderr"]
        rows.append(row)
    return rows


def plot(exp: Experiment, rows: list[dict], sets: dict[str, list[Path]]) -> list[Path]:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for family in [r["family"] for r in rows]:
        folder = attribution_dir(exp, family) / "prompts"
        per_prompt = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        left.scatter([column(r, "pruned.nodes") for r in per_prompt], [column(r, "pruned.completeness") for r in per_prompt],
                     s=12, alpha=0.6, label=family)
    left.set(xscale="log", xlabel="pruned graph nodes (node 0.8, edge 0.98)",
             ylabel="completeness of the pruned graph (pruned = error)")
    for row in rows:
        right.errorbar(row["l0_per_layer"], row["replacement"], yerr=row["replacement_stderr"], fmt="o", capsize=3,
                       label=row["family"])
    right.set(xlabel="mean L0 per layer (JumpReLU, held-out tokens)", ylabel="replacement score (unpruned graph)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M, every MLP replaced: attribution graphs over {rows[0]['n_prompts'] if rows else 0} "
                 "held-out prompts (bars: ± 1 SE over prompts)")
    columns = list(rows[0]) if rows else ["family"]
    return [save_figure(fig, exp.out_dir / "circuits.png"), write_points(rows, exp.out_dir / "circuits.csv", columns)]


@torch.no_grad()
def output_shares(exp: Experiment, sets: dict[str, list[Path]]) -> list[Path]:
    """Per family, the MLP outputs' norm² on the prompts' tokens (after BOS), summed over prompts and
    layers, split into what the error, the sparse features and the linear skip carry (b_dec aside)."""
    model = load_model(exp.config().model.name, device="cpu")
    prompts = read_prompts(str(PROMPTS))
    rows = []
    for family, checkpoints in sets.items():
        dictionaries = load_dictionaries(converted(checkpoints))
        hooks = {h for d in dictionaries for h in d.hooks_in + d.hooks_out}
        total = torch.zeros(4)  # output, error, features, skip
        for d in dictionaries:
            d.coder.eval()
        for prompt in prompts:
            _, cache = model.run_with_cache(prompt, names_filter=lambda name: name in hooks)
            for d in dictionaries:
                x = torch.stack([cache[h][0, 1:] for h in d.hooks_in], 1)
                y = torch.stack([cache[h][0, 1:] for h in d.hooks_out], 1)
                recon = d.coder(x).recon
                skip = torch.einsum("bld,lde->ble", x, d.coder.W_skip) if d.coder.W_skip is not None else 0 * y
                parts = [y, y - recon, recon - d.coder.b_dec - skip, skip]
                total += torch.stack([p.pow(2).sum() for p in parts])
        rows.append({"family": family, **{f"{name}_share": (total[i] / total[0]).item()
                                          for i, name in enumerate(["output", "error", "features", "skip"]) if i}})
        print(family, {k: round(v, 3) for k, v in rows[-1].items() if k != "family"})
    return [write_points(rows, exp.out_dir / "output_shares.csv", list(rows[0]))]


def write_prompts() -> list[Path]:
    """CLASSIC + the first words of sentences of the held-out sotu speeches (the documents the cache,
    and so every dictionary, never trained on: split_documents under train.seed 0), ≤ 10 words."""
    from nn_decomp.data.text import load_texts, split_documents

    data = compose_config("config", ["data=sotu"]).data
    held_out = split_documents(load_texts("sotu"), data.eval_fraction, 0)[1]
    starts = []
    for document in held_out:
        for sentence in re.split(r"(?<=[.!?])\s+", document[data.column]):
            words = sentence.split()
            if len(words) >= 12 and words[0][0].isupper():
                starts.append(" ".join(words[:random.Random(len(starts)).randint(5, 8)]))
    chosen = random.Random(0).sample(starts, N_HELDOUT_PROMPTS)
    PROMPTS.write_text("# exp_007 prompts: classic short prompts, then sentence starts from the held-out sotu "
                       "speeches\n# (run.py --write-prompts)\n" + "\n".join(CLASSIC + chosen) + "\n")
    return [PROMPTS]


def main(argv: list[str]) -> list[Path]:
    exp, flags, _ = Experiment.from_args(NAME, argv, __doc__, SCALES)
    if "--write-prompts" in flags:
        return report_written(write_prompts())
    if "--print-commands" in flags:
        if exp.config().data.source == "cache":
            print(cache_command(exp))
        return exp.print_commands(grids(exp.scale))
    rows = exp.collect() if flags & {"--no-train", "--table-only", "--output-shares"} else exp.run_sweeps(grids(exp.scale))
    sets = family_sets(rows, exp.sweep_dir, exp.scale)
    if "--output-shares" in flags:
        return report_written(output_shares(exp, sets))
    if "--table-only" not in flags:
        for family, checkpoints in sets.items():
            attribute_family(exp, family, checkpoints)
    findings = table(exp, sets)
    return report_written(plot(exp, findings, sets))


if __name__ == "__main__":
    main(sys.argv[1:])
