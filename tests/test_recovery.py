"""Ground-truth recovery: train on synthetic activations built from known sparse features and check
that the learned dictionary contains them.

Data (helpers.PlantedFeatures): unit-norm feature directions; each token is a non-negative sparse
combination of them, each feature firing with probability 4/N and magnitude uniform in [0.5, 1.5]
(scaled so E‖x‖² ≈ d, the normalisation runtime/training.py applies; the Trainer gets unit scales). Every
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

from helpers import PlantedFeatures, compose_cfg, max_cosine, one_thread, unit_rows  # noqa: F401
from nn_decomp.runtime.checkpoint import build_coder
from nn_decomp.core.coder import SparseCoder
from nn_decomp.config.data import SyntheticDataConfig
from nn_decomp.data.synthetic import SyntheticData, max_cosines
from nn_decomp.runtime.trainer import Trainer

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


def train(draw, cfg, coder: SparseCoder, steps: int, batch: int) -> str:
    """Train on fresh batches `draw(n)` → (x, target); returns the time taken (wall and CPU: on a
    shared machine the CPU time is what an idle one would take). b_dec starts at the target mean, as
    in train.init_coder."""
    L = coder.n_layers
    trainer = Trainer(cfg, coder, steps, torch.ones(L), torch.ones(L))
    with torch.no_grad():
        coder.b_dec.copy_(draw(4096)[1].mean(0))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step(*draw(batch))
    return f"{steps} steps: {time.perf_counter() - wall:.1f}s wall, {time.process_time() - cpu:.1f}s cpu"


def autoencode(pf: PlantedFeatures):
    return lambda n: (lambda x: (x, x))(pf.batch(n)[0])


def transcode(pf: PlantedFeatures):
    return lambda n: pf.batch(n)[:2]


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
    timing = train(autoencode(pf), cfg, coder, steps=500, batch=512)
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
    timing = train(transcode(pf), cfg, coder, steps=600, batch=512)
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
    timing = train(transcode(pf), cfg, coder, steps=450, batch=512)
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


def test_crosscoder_recovers_planted_features_that_span_layers():
    # synthetic.py's crosscoder task: 128 features, each one unit direction over 3 layers × 32 dims,
    # present in a random subset of the layers (at least one) and firing in all of them at once.
    L, d, n_latents = 3, 32, 256
    data_cfg = SyntheticDataConfig(n_features=128, d_in=d, d_out=d, mean_l0=4.0, zipf_offset=1e9, n_parents=0,
                                   magnitude_sigma=0.2)
    data = SyntheticData(data_cfg, "crosscoder", L, batch_size=512, seed=0, device="cpu")
    torch.manual_seed(0)
    cfg = compose_cfg("arch=crosscoder", f"arch.layers=[{','.join(map(str, range(L)))}]", "act=topk",
                      f"arch.n_latents={n_latents}", *COMMON, "act.k=4")
    coder = build_coder(cfg, d, d)
    true_NLD = data.truth.dec_LNX[0].view(-1, L, d)
    assert max_cosine(true_NLD.flatten(1), coder.decoder(0).detach().flatten(1)).mean() < 0.5
    timing = train(lambda n: data.rows(n, data.generator)[:2], cfg, coder, steps=600, batch=512)
    learned_FLD = coder.decoder(0).detach()
    cos_N, match_N = max_cosines(learned_FLD.flatten(1), true_NLD.flatten(1))
    # the matched latent's write to each layer: aligned where the feature is, ~0 where it is not
    present_NL = true_NLD.norm(dim=-1) > 0
    norms_NL = learned_FLD[match_N].norm(dim=-1)
    share_on_absent = (norms_NL * ~present_NL).sum() / norms_NL.sum()
    per_layer = torch.cosine_similarity(true_NLD, learned_FLD[match_N], dim=-1)[present_NL]
    report("crosscoder/topk", {"mean": cos_N.mean().item(), "present layers": per_layer.mean().item(),
                               "norm on absent layers": share_on_absent.item()}, timing)
    assert cos_N.mean() >= 0.9 and per_layer.mean() >= 0.9
    assert share_on_absent < 0.05


def planted_maps(n_maps: int, rank: int, d: int, seed: int):
    """MOLT's ground truth: n_maps rank-`rank` maps M_t = U_tᵀ V_t (orthonormal rows), each gated by
    its own sparse feature. x = dense noise + Σ_t a_t e_t (a_t ≥ 0 fires with probability 2/n_maps;
    e_t a unit direction the gate can read); y = Σ_t a_t M_t x. Returns (draw, U [T, r, d], V [T, r, d])."""
    g = torch.Generator().manual_seed(seed)
    U, V = (torch.linalg.qr(torch.randn(n_maps, d, rank, generator=g)).Q.transpose(1, 2) for _ in range(2))
    e_TD = unit_rows(n_maps, d, g)

    def draw(n: int):
        u = torch.rand(n, n_maps, generator=g)
        a_BT = (u < 2 / n_maps) * (0.5 + u * n_maps / 2) * 3
        x_BD = torch.randn(n, d, generator=g) + a_BT @ e_TD
        y_BD = torch.einsum("bt,tjo,tji,bi->bo", a_BT, U, V, x_BD)
        return x_BD[:, None], y_BD[:, None]
    return draw, U, V


def subspace_alignment(A_TrD: torch.Tensor, B_TrD: torch.Tensor) -> torch.Tensor:
    """[T] ‖P_A P_B‖_F² / r for the row spaces of A_t and B_t: 1 when they coincide."""
    qa, qb = (torch.linalg.qr(m.transpose(1, 2)).Q for m in (A_TrD, B_TrD))
    return (qa.transpose(1, 2) @ qb).pow(2).sum((1, 2)) / A_TrD.shape[1]


def test_molt_recovers_planted_sparse_low_rank_maps():
    n_maps, rank, d = 16, 4, 32
    draw, U_true, V_true = planted_maps(n_maps, rank, d, seed=4)
    torch.manual_seed(0)
    cfg = compose_cfg("arch=molt", "act=topk", "arch.n_latents=32", f"arch.molt_ranks=[{rank}]", *COMMON, "act.k=2")
    coder = build_coder(cfg, d, d)
    maps = lambda U, V: (U.transpose(1, 2) @ V).flatten(1)  # [T, d_out·d_in]  # noqa: E731
    learned = lambda: [w.detach().view(-1, rank, d) for w in (coder.transforms.U, coder.transforms.V)]  # noqa: E731
    assert max_cosine(maps(U_true, V_true), maps(*learned())).mean() < 0.5
    timing = train(draw, cfg, coder, steps=800, batch=512)
    U, V = learned()
    map_cos_T, match_T = max_cosines(maps(U, V), maps(U_true, V_true))
    # the matched transform's input (row) and output (column) spaces, from its map's top-r SVD
    left, _, right = torch.linalg.svd((U.transpose(1, 2) @ V)[match_T])
    inputs = subspace_alignment(V_true, right[:, :rank])
    outputs = subspace_alignment(U_true, left[:, :, :rank].transpose(1, 2))
    alignment_T = (inputs + outputs) / 2
    report("molt/topk", {"subspace alignment": alignment_T.mean().item(), "min": alignment_T.min().item(),
                         "map cosine": map_cos_T.mean().item()}, timing)
    assert alignment_T.mean() >= 0.9 and map_cos_T.mean() >= 0.9
