"""Ground-truth recovery: train on synthetic activations built from known sparse features and check
that the learned dictionary contains them.

Data (helpers.PlantedFeatures): unit-norm feature directions; each token is a non-negative sparse
combination of them, each feature firing with probability 4/N and magnitude uniform in [0.5, 1.5]
(scaled so E‖x‖² ≈ d, the normalisation train.py applies; the Trainer gets unit scales). Every
step draws a fresh batch. Score: mean over true features of the best cosine with a learned decoder
vector (1 = every feature found exactly; each test first checks that the untrained dictionary
scores < 0.5, so a pass is learned, not inherited from the initialisation).

The SAE runs 256 features in 128 dims: at 64 dims BatchTopK plateaus near 0.9 in this budget (most
latents stop being selected early and AuxK does not revive them; warm-started from a TopK
dictionary it keeps a 0.99 score), while TopK, ReLU and JumpReLU reach 0.98-0.99 there too.
"""
import time

import pytest
import torch

from helpers import PlantedFeatures, compose_cfg, max_cosine, one_thread  # noqa: F401
from nn_decomp.checkpoint import build_coder
from nn_decomp.coder import SparseCoder
from nn_decomp.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# Per-activation overrides, on top of conf/act/*.yaml; k is the planted L0.
# JumpReLU: its default target-L0 penalty, told the planted L0 as TopK is told k.
ACT_OVERRIDES = {
    "relu": [],
    "topk": ["act.k=4"],
    "batchtopk": ["act.k=4"],
    "jumprelu": ["act.target_l0=4"],
}
COMMON = ["train.warmup_steps=20", "train.optimizer.lr=3e-3"]


def train(pf: PlantedFeatures, cfg, coder: SparseCoder, steps: int, batch: int, autoencode: bool) -> str:
    """Train on fresh batches; returns the time taken (wall and CPU: on a shared machine the CPU
    time is what an idle one would take). b_dec starts at the target mean, as in train.init_coder."""
    L = coder.n_layers
    trainer = Trainer(cfg, coder, steps, torch.ones(L), torch.ones(L))
    x, y, _ = pf.batch(4096)
    with torch.no_grad():
        coder.b_dec.copy_((x if autoencode else y).mean(0))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        x, y, _ = pf.batch(batch)
        trainer.train_step(x, x if autoencode else y)
    return f"{steps} steps: {time.perf_counter() - wall:.1f}s wall, {time.process_time() - cpu:.1f}s cpu"


def report(name: str, scores: dict[str, float], timing: str) -> None:
    print(f"\n[recovery] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + f" ({timing})")


@pytest.mark.parametrize("act", list(ACT_OVERRIDES))
def test_sae_recovers_planted_features(act):
    n_features, d, n_latents = 256, 128, 512
    pf = PlantedFeatures.make(n_features, d, seed=1)
    torch.manual_seed(0)  # a different stream from the data's generator
    cfg = compose_cfg("arch=sae", f"act={act}", f"arch.n_latents={n_latents}", *COMMON, *ACT_OVERRIDES[act])
    coder = build_coder(cfg, d, d)
    assert max_cosine(pf.enc_LND[0], coder.W_dec[0][:, 0].detach()).mean() < 0.5
    timing = train(pf, cfg, coder, steps=500, batch=512, autoencode=True)
    cos_N = max_cosine(pf.enc_LND[0], coder.W_dec[0][:, 0].detach())
    report(f"sae/{act}", {"mean": cos_N.mean().item(), "min": cos_N.min().item(),
                          "frac>0.9": (cos_N > 0.9).float().mean().item()}, timing)
    assert cos_N.mean() >= 0.9


def test_transcoder_recovers_planted_input_and_output_directions():
    # x = z·E, y = z·D_out with D_out other unit directions: a sparse linear map through z.
    n_features, d, n_latents = 256, 64, 512
    pf = PlantedFeatures.make(n_features, d, d, seed=2)
    torch.manual_seed(0)
    cfg = compose_cfg("arch=transcoder", "act=topk", f"arch.n_latents={n_latents}", *COMMON, "act.k=4")
    coder = build_coder(cfg, d, d)
    assert max_cosine(pf.dec[0][:, 0], coder.W_dec[0][:, 0].detach()).mean() < 0.5
    timing = train(pf, cfg, coder, steps=600, batch=512, autoencode=False)
    dec_N = max_cosine(pf.dec[0][:, 0], coder.W_dec[0][:, 0].detach())
    enc_N = max_cosine(pf.enc_LND[0], coder.W_enc[0].detach())
    report("transcoder/topk", {"decoder": dec_N.mean().item(), "encoder": enc_N.mean().item()}, timing)
    assert dec_N.mean() >= 0.9
    assert enc_N.mean() >= 0.75  # the encoder also filters interference, so it is less aligned


@pytest.mark.parametrize("tying", ["none", "per_source", "per_target"])
def test_clt_recovers_planted_cross_layer_decoders(tying):
    # Three layers; a feature at source layer i writes a unit direction to every layer j ≥ i: its
    # own per target (none), one for all its targets (per_source), or target j's shared one
    # (per_target). Each is trained with the tying of its planted model.
    n_features, d, n_latents, L = 96, 32, 192, 3
    pf = PlantedFeatures.make(n_features, d, d, n_layers=L, cross_layer=True, seed=3, tying=tying)
    torch.manual_seed(0)
    cfg = compose_cfg("arch=clt", f"arch.layers=[{','.join(map(str, range(L)))}]", "act=topk",
                      f"arch.n_latents={n_latents}", *COMMON, "act.k=4", f"arch.decoder_tying={tying}")
    coder = build_coder(cfg, d, d)
    assert max_cosine(pf.dec[0].flatten(1), coder.decoders()[0].detach().flatten(1)).mean() < 0.5
    timing = train(pf, cfg, coder, steps=600, batch=512, autoencode=False)
    scores, per_target = {}, []
    for i in range(L):
        true_NX = pf.dec[i].flatten(1)  # [N, (L−i)·D]: concatenated over targets
        learned_FTD = coder.decoders()[i].detach()
        true_n = true_NX / true_NX.norm(dim=-1, keepdim=True)
        learned_n = learned_FTD.flatten(1) / learned_FTD.flatten(1).norm(dim=-1, keepdim=True)
        match_N = (true_n @ learned_n.T).argmax(-1)  # best latent for each true feature
        for t in range(L - i):  # then each target's vector of that latent on its own
            cos_N = torch.cosine_similarity(pf.dec[i][:, t], learned_FTD[match_N, t], dim=-1)
            scores[f"{i}->{i + t}"] = cos_N.mean().item()
            per_target.append(cos_N)
    report(f"clt/topk tying={tying}", scores, timing)
    assert torch.cat(per_target).mean() >= 0.9
    assert min(scores.values()) >= 0.85
