"""Synthetic activations with planted ground truth (`data=synthetic`), and how well a dictionary
recovers it. The idea of SAELens' SynthSAEBench; our own code.

A model (`data=synthetic`, config.SyntheticDataConfig) of `n_features` true features per layer, each a unit direction in d_in dims:
- frequency: feature of rank r fires with probability ∝ 1/(r + zipf_offset), scaled to a mean
  number of active features `mean_l0`;
- hierarchy: `n_parents` features each have `children_per_parent` children that fire only when
  their parent fires (probability `child_prob` given the parent): the setting of feature absorption;
- correlation: features in one of `n_groups` groups share a Gaussian factor (Gaussian copula with
  correlation `correlation`), so they tend to fire together;
- magnitudes: log-normal(0, `magnitude_sigma`); Gaussian `noise` on every input dim;
- scale: x (and y) multiplied so that E‖x‖² = d.
The task sets what is to be reconstructed (arch): `sae` y = x; `transcoder` y = Σ a_f e_f, each
feature writing its own unit direction e_f in d_out dims (a planted sparse map), plus
`skip_scale`·M x for a planted dense map M (what a skip transcoder's W_skip is for); `clt` one such
transcoder per layer, but a feature of layer l writes to every layer j ≥ l, `cross_layer_scale`
times weaker for j > l; `crosscoder` y = x over L layers whose features are shared: each is one unit
direction in the L·d_in stacked dims, present in a random subset of the layers (each with
probability 1/2, at least one), and fires in all of them at once.
Batches are a function of (seed, step): every trainer sees identical rows.
"""
from typing import NamedTuple

import torch
from torch import Tensor

from nn_decomp.config.data import SyntheticDataConfig

# Every generator here is seeded apart from the others and from torch.manual_seed(train.seed), which
# initialises the coder: a planted model drawn from the coder's own seed would be its initial decoder.
# (The CPU generator keeps only a seed's low 32 bits.)
TRUTH_SEED, STREAM_SEED, EVAL_SEED = 1_000_000_007, 2_000_000_011, 3_000_000_019


class Truth(NamedTuple):
    """The planted model. enc_LND: [L, N, d_in] read directions; dec_LNX: [L, N, X] write directions,
    concatenated over the layers j ≥ l a feature of layer l writes (X = (L − l)·d_out for a CLT;
    padded with zeros to L·d_out); p_N: [N] firing probability (a child's: its parent's·child_prob);
    parent_N: [N] parent id or −1."""

    enc_LND: Tensor
    dec_LNX: Tensor
    skip_LDE: Tensor
    p_N: Tensor
    parent_N: Tensor
    group_N: Tensor


def unit(t: Tensor) -> Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def plant(cfg: SyntheticDataConfig, task: str, n_layers: int) -> Truth:
    """The ground truth of `task` (sae | transcoder | clt | crosscoder) over n_layers layers (a
    crosscoder's: one layer of n_layers·d_in stacked dims)."""
    g = torch.Generator().manual_seed(TRUTH_SEED + cfg.truth_seed)
    N, L, D, E = cfg.n_features, n_layers, cfg.d_in, cfg.d_out
    if task == "crosscoder":
        present = torch.rand(N, L, generator=g) < 0.5
        present[torch.arange(N), torch.randint(L, (N,), generator=g)] = True
        enc = unit((torch.randn(N, L, D, generator=g) * present[..., None]).flatten(1))[None]
        L = 1
    else:
        enc = unit(torch.randn(L, N, D, generator=g))
    if task in ("sae", "crosscoder"):
        dec = enc.clone()
    else:
        # write of the feature of layer l to layer j: zero for j < l (no weight), 1 or cross_layer_scale
        writes = unit(torch.randn(L, N, L, E, generator=g))
        strength = torch.ones(L, L).triu() if task == "clt" else torch.eye(L)
        strength = strength * torch.where(torch.eye(L, dtype=torch.bool), 1.0, cfg.cross_layer_scale)
        dec = (writes * strength[:, None, :, None]).flatten(2)
    skip = torch.randn(L, D, E, generator=g) / D ** 0.5 * cfg.skip_scale

    order = torch.randperm(N, generator=g)  # feature order[r] has frequency rank r
    p = torch.empty(N)
    p[order] = 1 / (torch.arange(N) + cfg.zipf_offset)
    n_children = cfg.n_parents * cfg.children_per_parent
    assert cfg.n_parents + n_children <= N, "n_parents·(children_per_parent + 1) exceeds n_features"
    # parents among the frequent half (general features, e.g. "starts with S", are the common ones),
    # children among the other features: a child fires at p_parent·child_prob, never alone
    parents = order[:N // 2][torch.randperm(N // 2, generator=g)[:cfg.n_parents]]
    is_parent = torch.zeros(N, dtype=torch.bool)
    is_parent[parents] = True
    others = torch.randperm(N, generator=g)
    children = others[~is_parent[others]][:n_children]
    parent = torch.full((N,), -1, dtype=torch.long)
    parent[children] = parents.repeat_interleave(cfg.children_per_parent)
    # a child's own rank is unused: its probability is its parent's times child_prob (what it fires at,
    # so recovery's frequency terciles are by how often a feature fires)
    p[children] = p[parent[children]] * cfg.child_prob
    scale = cfg.mean_l0 / p.sum()  # so that the expected number of active features is mean_l0
    p = (p * scale).clamp(max=1.0)
    p[children] = p[parent[children]] * cfg.child_prob
    group = torch.randint(max(cfg.n_groups, 1), (N,), generator=g)
    return Truth(enc, dec, skip, p, parent, group)


def task_of(arch_name: str) -> str:
    """The synthetic task an architecture learns: a skip transcoder's and a MOLT's are the transcoder's."""
    return {"skip_transcoder": "transcoder", "molt": "transcoder"}.get(arch_name, arch_name)


class Draw(NamedTuple):
    """The active features of n_rows tokens: token b, layer l, feature n, magnitude (1-D, aligned)."""

    b: Tensor
    l: Tensor
    n: Tensor
    magnitude: Tensor
    shape: tuple[int, int, int]

    def dense(self) -> Tensor:
        """[B, L, N] magnitudes (0 where a feature is off)."""
        return torch.zeros(self.shape).index_put_((self.b, self.l, self.n), self.magnitude)


def sample(truth: Truth, cfg: SyntheticDataConfig, n_rows: int, g: torch.Generator) -> tuple[Tensor, Draw]:
    """n_rows tokens: the input x_BLD (unscaled) and the active features."""
    L, N, D = truth.enc_LND.shape
    if cfg.n_groups > 0 and cfg.correlation > 0:
        # Gaussian copula: a feature fires when its correlated normal falls below Φ⁻¹(p)
        shared = torch.randn(n_rows, L, cfg.n_groups, generator=g)[..., truth.group_N]
        z = cfg.correlation ** 0.5 * shared + (1 - cfg.correlation) ** 0.5 * torch.randn(n_rows, L, N, generator=g)
        fires = z < torch.distributions.Normal(0.0, 1.0).icdf(truth.p_N.clamp(1e-7, 1 - 1e-7))
    else:
        fires = torch.rand(n_rows, L, N, generator=g) < truth.p_N
    children = (truth.parent_N >= 0).nonzero()[:, 0]
    child_fires = torch.rand(n_rows, L, len(children), generator=g) < cfg.child_prob
    fires[..., children] = fires[..., truth.parent_N[children]] & child_fires
    b, l, n = fires.nonzero(as_tuple=True)
    draw = Draw(b, l, n, torch.exp(cfg.magnitude_sigma * torch.randn(len(b), generator=g)), (n_rows, L, N))
    x = cfg.noise * torch.randn(n_rows * L, D, generator=g)
    # index_add_, not index_put_(accumulate=True): the same rows in the same order on every run
    x.index_add_(0, b * L + l, draw.magnitude[:, None] * truth.enc_LND[l, n])
    return x.view(n_rows, L, D), draw


class SyntheticData:
    """The training stream of a synthetic task (`next_batch` → x_BLD, y_BLD, scaled so that
    E‖x‖² = d_in and E‖y‖² = d_out at each layer), with the ActivationsStore's interface. Batch i is a function
    of (truth_seed, seed, i) alone: peers fed from another instance see identical rows."""

    def __init__(self, cfg: SyntheticDataConfig, task: str, n_layers: int, batch_size: int, seed: int, device,
                 shard: tuple[int, int] = (0, 1)):
        """shard: (data-parallel rank, ranks): batch_size is the rank's slice of ranks·batch_size rows."""
        assert task in ("sae", "transcoder", "clt", "crosscoder"), task
        self.cfg, self.task, self.batch_size, self.device, self.shard = cfg, task, batch_size, device, shard
        self.n_layers = n_layers
        self.truth = plant(cfg, task, n_layers)
        self.generator = torch.Generator().manual_seed(STREAM_SEED + seed)
        x, draw = sample(self.truth, cfg, 8192, torch.Generator().manual_seed(EVAL_SEED + 1 + cfg.truth_seed))
        self.scale_x_L1 = (x.shape[-1] / x.pow(2).sum(-1).mean(0)).sqrt()[:, None]
        y = self.target(x, draw)
        self.scale_y_L1 = (y.shape[-1] / y.pow(2).sum(-1).mean(0)).sqrt()[:, None]

    def target(self, x_BLD: Tensor, draw: Draw) -> Tensor:
        """[B, L, d_out]: what the dictionary reconstructs at each layer (unscaled)."""
        if self.task in ("sae", "crosscoder"):
            return x_BLD
        B, L, _ = x_BLD.shape
        # the feature of layer l writes dec[l, n, j·E:(j+1)·E] to layer j
        y = torch.einsum("bld,lde->ble", x_BLD, self.truth.skip_LDE).flatten(1)
        y.index_add_(0, draw.b, draw.magnitude[:, None] * self.truth.dec_LNX[draw.l, draw.n])
        return y.view(B, L, -1)

    def rows(self, n_rows: int, g: torch.Generator) -> tuple[Tensor, Tensor, Draw]:
        """(x, y, active features) of n_rows tokens, x and y scaled and on the device (a crosscoder's
        stacked dims split back into its layers, after one scale for all)."""
        x, draw = sample(self.truth, self.cfg, n_rows, g)
        y = self.target(x, draw)
        x, y = (x * self.scale_x_L1).view(n_rows, self.n_layers, -1), (y * self.scale_y_L1).view(n_rows, self.n_layers, -1)
        return x.to(self.device), y.to(self.device), draw

    @classmethod
    def for_run(cls, cfg, device, rank: int = 0, world_size: int = 1) -> "SyntheticData":
        """The training stream of a run config (`data=synthetic`): train.batch_size rows per batch, or
        data-parallel rank `rank`'s 1/world_size of them (the same global batches as one process)."""
        return cls(cfg.data, task_of(cfg.arch.name), len(cfg.arch.layers), cfg.train.batch_size // world_size,
                   cfg.train.seed, device, (rank, world_size))

    def next_batch(self) -> tuple[Tensor, Tensor]:
        rank, world_size = self.shard
        x, y, _ = self.rows(self.batch_size * world_size, self.generator)
        mine = slice(rank * self.batch_size, (rank + 1) * self.batch_size)
        return x[mine], y[mine]

    def eval_rows(self, n_rows: int) -> tuple[Tensor, Tensor, Draw]:
        """A fixed held-out set, drawn from a seed no training stream uses."""
        return self.rows(n_rows, torch.Generator().manual_seed(EVAL_SEED + self.cfg.truth_seed))

    def skip(self, n_batches: int) -> None:
        for _ in range(n_batches):
            self.next_batch()

    def close(self) -> None:
        pass


# --- recovery metrics ------------------------------------------------------------------------


def max_cosines(dec_FX: Tensor, truth_NX: Tensor) -> tuple[Tensor, Tensor]:
    """[N] each true feature's best cosine with any learned decoder row, and which row."""
    return (unit(truth_NX) @ unit(dec_FX).T).max(-1)


def absorption(latents_BLF: Tensor, acts_BLN: Tensor, match_LN: Tensor, parent_N: Tensor) -> float:
    """Mean over parents of how much less often the parent's best-matching latent fires when a
    child fires too: recall(parent alone) − recall(parent with a child), clipped at 0. A latent
    that learned "parent but not child" while the child's latent carries the parent's direction
    has absorbed the child (Chanin et al. 2024)."""
    parents = parent_N[parent_N >= 0].unique()
    scores = []
    fired = latents_BLF != 0
    for layer in range(latents_BLF.shape[1]):
        for p in parents.tolist():
            on = acts_BLN[:, layer, p] > 0
            child = (acts_BLN[:, layer, parent_N == p] > 0).any(-1)
            alone, with_child = on & ~child, on & child
            if alone.sum() < 5 or with_child.sum() < 5:
                continue
            latent_on = fired[:, layer, match_LN[layer, p]]
            recall_alone = latent_on[alone].float().mean()
            recall_child = latent_on[with_child].float().mean()
            scores.append((recall_alone - recall_child).clamp(min=0).item())
    return sum(scores) / max(len(scores), 1)


def recovery(decoders: list[Tensor], truth: Truth, latents_BLF: Tensor, acts_BLN: Tensor) -> dict:
    """Max-cos scores per true feature (mean, fraction > 0.9, by frequency tercile) and absorption.
    decoders[l]: [F, X_l] the decoder rows of source layer l, concatenated over the layers they
    write (the truth's writes to earlier layers are zero, so its last X_l columns are compared)."""
    best, match = zip(*(max_cosines(w, truth.dec_LNX[l, :, -w.shape[-1]:]) for l, w in enumerate(decoders)))
    best_LN, match_LN = torch.stack(best), torch.stack(match)
    terciles = truth.p_N.argsort(descending=True).tensor_split(3)  # frequent, middle, rare
    return {"mean_max_cos": best_LN.mean().item(), "frac_above_0.9": (best_LN > 0.9).float().mean().item(),
            **{f"max_cos_{name}": best_LN[:, idx].mean().item()
               for name, idx in zip(("frequent", "middle", "rare"), terciles)},
            "absorption": absorption(latents_BLF, acts_BLN, match_LN, truth.parent_N)}
