"""Background activation generation (`data.background=true`) vs the LM in the trainer's process.

    python benchmarks/background.py               # SmolLM2 transcoder, layers 2 and 6, 4096 latents, 48 steps of 1024
    python benchmarks/background.py --quick       # a smoke run

In one process, the LM loaded once, for each layer (one core each: the trainer's torch uses 1
thread, the child's 1 thread; run it on an otherwise idle machine with ≥ 2 cores):
- LM alone:    the ActivationsStore producing the N batches (its shuffle buffer refills included);
- train alone: N `Trainer.train_step`s on those batches, already in memory;
- serial:      both in turn, as `data.background=false` trains (≈ LM + train);
- background:  the same store forked into a child writing the shared-memory ring, the trainer
               stepping on what it reads (`data.background=true`): the target is max(LM, train).
Every configuration trains on the same batches (tests/test_background.py checks it bitwise).
"""
import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from nn_decomp.data.background import BackgroundStore
from nn_decomp.runtime.checkpoint import build_coder
from nn_decomp.models import load_model
from nn_decomp.data.store import lm_stores
from nn_decomp.runtime.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def config(layer: int, n_latents: int, batch: int):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["arch=transcoder", f"arch.layers=[{layer}]", f"arch.n_latents={n_latents}",
                                            "act=topk", "act.k=32", f"train.batch_size={batch}", "model.device=cpu"])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(cfg, model, n_steps: int) -> dict[str, float]:
    def store():
        return lm_stores(cfg, model, torch.device("cpu"), cfg.train.batch_size).train

    def trainer():
        torch.manual_seed(0)
        coder = build_coder(cfg, model.cfg.d_model, model.cfg.d_model)
        ones = torch.ones(1)
        return Trainer(cfg, coder, 10**6, ones, ones.clone())

    s = store()
    s.next_batch()  # the first refill (tokenising, a full buffer) happens in every configuration alike
    batches = []
    lm = timed(lambda: batches.extend(s.next_batch() for _ in range(n_steps)))
    t = trainer()
    train = timed(lambda: [t.train_step(*b) for b in batches])

    def run(source):
        t = trainer()
        source.next_batch()
        return timed(lambda: [t.train_step(*source.next_batch()) for _ in range(n_steps)])

    serial = run(store())
    bg = BackgroundStore(store(), threads=1)  # data.background_slots' default
    background = run(bg)
    bg.close()
    return {"LM alone": lm, "train alone": train, "serial": serial, "background": background}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    args = parser.parse_args()
    torch.set_num_threads(1)
    n_latents, batch, n_steps = (512, 256, 6) if args.quick else (4096, 1024, 48)
    model = load_model("smollm2_135m", "cpu", "float32", max(args.layers) + 1)
    print(f"SmolLM2 transcoder, TopK k=32, {n_latents} latents, {n_steps} steps of {batch} tokens; "
          "1 thread for the trainer, 1 for the LM's child process")
    print("| layer | LM alone s | train alone s | serial s | background s | max(LM, train) s | background / max |")
    print("|---|---|---|---|---|---|---|")
    for layer in args.layers:
        r = measure(config(layer, n_latents, batch), model, n_steps)
        floor = max(r["LM alone"], r["train alone"])
        print(f"| {layer} | {r['LM alone']:.1f} | {r['train alone']:.1f} | {r['serial']:.1f} | {r['background']:.1f} | "
              f"{floor:.1f} | {r['background'] / floor:.2f} |", flush=True)


if __name__ == "__main__":
    main()
