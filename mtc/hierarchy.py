"""What Matryoshka buys, measured: feature absorption against a known feature tree, and hierarchy from co-firing.

The toy (the setting of Bussmann et al. 2025 and Noa Nabeshima's matryoshka-saes): `n_parents` parent features, each
with `children_per_parent` children. A child fires only when its parent fires, and siblings exclude each other (at most
one child of a parent is active). The source is `x = f @ A + noise` (width d_in), the target `y = f @ B` (width d_out):
two read-outs of the same features `f`, with random unit rows. `ToyHierarchyStore` serves them to the `Trainer`.

*Absorption*: when a child fires, its parent always fires too, so a sparse code can save a latent by folding the parent
into the child's latent (its decoder writes parent + child) and leaving the parent's latent silent. The metrics below
measure it against the truth. The co-firing statistics need no truth and also apply to real activations: for each latent
of a later prefix group, its most likely parent among the earlier groups, `P(parent fires | child fires)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from .activations import ActivationBatch
from .config import TranscoderConfig
from .transcoder import MatryoshkaTranscoder, fvu


# ---------------------------------------------------------------------- the toy task
@dataclass(frozen=True)
class FeatureTree:
    """A two-level feature tree. Features `0..n_parents-1` are the parents; the children of parent `p` are features
    `n_parents + p * children_per_parent + c`."""

    n_parents: int = 8
    children_per_parent: int = 4
    p_parent: float = 0.15  # chance that a parent fires on a token
    p_child: float = 0.8  # chance that a firing parent has one (uniformly chosen) child active
    magnitude_spread: float = 0.0  # active features take values uniform in [1 - spread, 1 + spread] (0: binary)
    noise: float = 0.02  # standard deviation of the Gaussian noise per dimension of the source

    @property
    def n_features(self) -> int:
        return self.n_parents * (1 + self.children_per_parent)

    @property
    def parent_of(self) -> Tensor:
        """`[n_features]`: each feature's parent, -1 for the parents themselves."""
        children = torch.arange(self.n_parents).repeat_interleave(self.children_per_parent)
        return torch.cat([torch.full((self.n_parents,), -1), children])

    @property
    def mean_l0(self) -> float:
        """Expected active features per token."""
        return self.n_parents * self.p_parent * (1 + self.p_child)


class ToyHierarchyStore:
    """Serves toy batches like an `ActivationStore` serves a `Trainer`. Batch `i` depends only on (seed, i), so the
    state is one counter and resumption is exact; `held_out` draws from a separate stream of the same distribution."""

    TRAIN, HELD_OUT = 0, 1

    def __init__(self, d_in: int, d_out: int, batch_size: int, tree: FeatureTree = FeatureTree(), seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.A = F.normalize(torch.randn(tree.n_features, d_in, generator=gen), dim=1)  # source read-out
        self.B = F.normalize(torch.randn(tree.n_features, d_out, generator=gen), dim=1)  # target read-out
        self.tree, self.batch_size, self.seed = tree, batch_size, seed
        self.batches_served = 0

    def _generator(self, stream: int, index: int) -> torch.Generator:
        # torch's CPU generator keeps only the low 32 bits of a seed: mix (seed, stream, index) into 32 well-spread bits
        mixed = np.random.SeedSequence([self.seed, stream, index]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(mixed))

    def sample(self, n_tokens: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """`(f, x, y)` for `n_tokens` tokens: the true feature values `[n, n_features]`, source and target."""
        t = self.tree
        parents = torch.rand(n_tokens, t.n_parents, generator=gen) < t.p_parent
        with_child = parents & (torch.rand(n_tokens, t.n_parents, generator=gen) < t.p_child)
        which = torch.randint(t.children_per_parent, (n_tokens, t.n_parents, 1), generator=gen)
        children = torch.zeros(n_tokens, t.n_parents, t.children_per_parent)
        children.scatter_(2, which, with_child[..., None].float())
        active = torch.cat([parents.float(), children.flatten(1)], dim=1)
        spread = (2 * torch.rand(active.shape, generator=gen) - 1) * t.magnitude_spread
        f = active * (1 + spread)
        x = f @ self.A + t.noise * torch.randn(n_tokens, self.A.shape[1], generator=gen)
        return f, x, f @ self.B

    def next_batch(self) -> ActivationBatch:
        _, x, y = self.sample(self.batch_size, self._generator(self.TRAIN, self.batches_served))
        self.batches_served += 1
        zeros = torch.zeros(self.batch_size, dtype=torch.long)
        return ActivationBatch(sources=[x], targets=[y], context_ids=zeros, positions=zeros)

    def held_out(self, n_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
        """`(f, x, y)` for evaluation, never served in training."""
        return self.sample(n_tokens, self._generator(self.HELD_OUT, 0))

    def state_dict(self) -> dict:
        return {"batches_served": self.batches_served, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.batches_served = state["batches_served"]


# ---------------------------------------------------------------------- metrics against the truth
def cosines(a: Float[Tensor, "n d"], b: Float[Tensor, "m d"]) -> Float[Tensor, "n m"]:
    return F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T


def recovery(A: Float[Tensor, "n_features d_in"], B: Float[Tensor, "n_features d_out"],
             W_enc: Float[Tensor, "d_in d_sae"], W_dec: Float[Tensor, "d_sae d_out"]) -> tuple[Tensor, Tensor]:
    """Per true feature: the best cosine of its source read-out to an encoder direction, and of its target read-out
    to a decoder row."""
    return cosines(A, W_enc.T).max(1).values, cosines(B, W_dec).max(1).values


def match_features(B: Float[Tensor, "n_features d_out"], W_dec: Float[Tensor, "d_sae d_out"]) -> tuple[Tensor, Tensor]:
    """Each true feature's latent (the decoder row closest in cosine to its target read-out), and that cosine."""
    best = cosines(B, W_dec).max(1)
    return best.indices, best.values


def absorption_rates(active: Bool[Tensor, "tokens n_features"], fires: Bool[Tensor, "tokens d_sae"],
                     parent_of: Tensor, match: Tensor) -> Tensor:
    """Per parent feature: over tokens where it and one of its children are active, the share where the parent's
    latent is silent (NaN for a parent never seen with a child). Average it over parents for the absorption rate."""
    parents = (parent_of < 0).nonzero().squeeze(1)
    rates = torch.full((len(parents),), float("nan"))
    for i, p in enumerate(parents.tolist()):
        with_child = active[:, p] & active[:, parent_of == p].any(1)
        if with_child.any():
            rates[i] = (~fires[with_child, match[p]]).float().mean()
    return rates


def contamination(B: Float[Tensor, "n_features d_out"], W_dec: Float[Tensor, "d_sae d_out"], parent_of: Tensor,
                  match: Tensor) -> Tensor:
    """Per child feature: the cosine of its latent's decoder row to its parent's target read-out (about 0.7 when the
    latent writes parent + child, about 0 when it writes the child alone)."""
    children = (parent_of >= 0).nonzero().squeeze(1)
    return cosines(W_dec[match[children]], B[parent_of[children]]).diagonal()


def latent_groups(latents: Tensor, prefix_sizes: list[int]) -> Tensor:
    """The prefix group (0-based) that each latent index lies in."""
    return torch.bucketize(latents, torch.tensor(prefix_sizes), right=True)


# ---------------------------------------------------------------------- hierarchy from co-firing
class CoFiring:
    """How often each latent fires and each pair fires together, summed over batches of latent activations. Holds a
    `[d_sae, d_sae]` float64 matrix (2.7 GB for 18,432 latents): put it on the GPU or sample latents for big models."""

    def __init__(self, d_sae: int, device: torch.device | str | None = None):
        self.n_tokens = 0
        self.counts = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.joint = torch.zeros(d_sae, d_sae, dtype=torch.float64, device=device)

    def update(self, latents: Float[Tensor, "tokens d_sae"]) -> None:
        fires = (latents > 0).float().to(self.joint.device)
        self.n_tokens += fires.shape[0]
        self.counts += fires.sum(0).double()
        self.joint += (fires.T @ fires).double()  # exact in float32 below 2**24 tokens a batch

    def frequency_order(self) -> Tensor:
        """Latents from most to least frequent: the pseudo-groups of a plain transcoder."""
        return self.counts.argsort(descending=True, stable=True)


@dataclass
class Hierarchy:
    """For each latent of a later (pseudo-)group that fires: its most likely parent in the earlier groups."""

    latents: Tensor  # [n] the later-group latents that fired
    parents: Tensor  # [n] each one's most likely parent
    p_parent: Tensor  # [n] P(parent fires | latent fires)
    lift: Tensor  # [n] p_parent / P(parent fires)
    decoder_cos: Tensor  # [n] cosine between the two decoder rows
    share: float  # share of the latents whose p_parent reaches the threshold (NaN when none fired)

    def summary(self) -> dict:
        mean = lambda t: float(t.float().mean()) if len(t) else float("nan")  # noqa: E731
        return {"hierarchy_share": self.share, "p_parent_mean": mean(self.p_parent), "lift_mean": mean(self.lift),
                "lift_median": float(self.lift.median()) if len(self.lift) else float("nan"),
                "parent_decoder_cos_mean": mean(self.decoder_cos), "n_children": len(self.latents)}

    def subset(self, keep: Tensor, threshold: float) -> Hierarchy:
        """The children selected by the boolean mask `keep`, with their own share."""
        p_parent = self.p_parent[keep]
        share = float((p_parent >= threshold).float().mean()) if len(p_parent) else float("nan")
        return Hierarchy(latents=self.latents[keep], parents=self.parents[keep], p_parent=p_parent,
                         lift=self.lift[keep], decoder_cos=self.decoder_cos[keep], share=share)


def hierarchy(cofiring: CoFiring, group_sizes: list[int], W_dec: Float[Tensor, "d_sae d_out"],
              order: Tensor | None = None, threshold: float = 0.9) -> Hierarchy:
    """Most likely parents from co-firing. `order` ranks the latents before they are cut into groups of
    `group_sizes` (None: as they are, a Matryoshka's own groups; `cofiring.frequency_order()` for a plain one)."""
    device = cofiring.joint.device  # computed where the counts are (the GPU for large dictionaries)
    order = torch.arange(len(cofiring.counts), device=device) if order is None else order.to(device)
    counts, joint = cofiring.counts[order], cofiring.joint[order][:, order]
    starts = torch.tensor([0, *group_sizes], device=device).cumsum(0)[:-1]
    group_start = starts.repeat_interleave(torch.tensor(group_sizes, device=device))  # [d_sae] start of its group
    earlier = torch.arange(len(counts), device=device)[None, :] < group_start[:, None]  # [child, candidate parent]
    best = (joint / counts.clamp_min(1)[:, None]).masked_fill_(~earlier, -1.0).max(1)
    children = ((group_start > 0) & (counts > 0)).nonzero().squeeze(1)
    p_parent, parents = best.values[children].float(), best.indices[children]
    base_rate = counts[parents].float() / max(cofiring.n_tokens, 1)
    latents, parents = order[children], order[parents]
    W = F.normalize(W_dec.detach().float().to(device), dim=1)
    share = float((p_parent >= threshold).float().mean()) if len(children) else float("nan")
    lift, decoder_cos = p_parent / base_rate.clamp_min(1e-12), (W[latents] * W[parents]).sum(1)
    return Hierarchy(latents=latents.cpu(), parents=parents.cpu(), p_parent=p_parent.cpu(), lift=lift.cpu(),
                     decoder_cos=decoder_cos.cpu(), share=share)


HISTOGRAM_BINS = 20  # of P(parent | child) over [0, 1], in the eval report


def hierarchy_report(cofiring: CoFiring, group_sizes: list[int], W_dec: Float[Tensor, "d_sae d_out"],
                     pseudo_groups: bool, threshold: float = 0.9) -> dict:
    """The co-firing hierarchy of a transcoder, overall and per later group (the eval report's `hierarchy`).
    `pseudo_groups`: cut the latents, ordered by firing frequency, into groups of `group_sizes` (a plain
    transcoder); otherwise the groups are the latents in index order (a Matryoshka's own)."""
    order = cofiring.frequency_order() if pseudo_groups else None
    tree = hierarchy(cofiring, group_sizes, W_dec, order=order, threshold=threshold)
    d_sae = len(cofiring.counts)
    rank = torch.arange(d_sae)
    if order is not None:
        rank[order.cpu()] = torch.arange(d_sae)
    child_group = torch.bucketize(rank[tree.latents], torch.tensor(group_sizes).cumsum(0), right=True)
    groups = []
    for g in range(1, len(group_sizes)):
        part = tree.subset(child_group == g, threshold)
        histogram = torch.histc(part.p_parent.float(), bins=HISTOGRAM_BINS, min=0.0, max=1.0)
        groups.append({"group": g + 1, "latents": group_sizes[g], **part.summary(),
                       "p_parent_histogram": [int(c) for c in histogram.tolist()]})
    return {"pseudo_groups": pseudo_groups, "threshold": threshold, "group_sizes": list(group_sizes),
            "tokens": cofiring.n_tokens, **tree.summary(), "groups": groups}


def plot_hierarchy(reports: dict[str, dict], path: Path) -> Path:
    """One panel per later group: the distribution of P(parent | child), one line per report with a hierarchy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = {name: r["hierarchy"] for name, r in reports.items() if "hierarchy" in r}
    n_panels = max(len(h["groups"]) for h in reports.values())
    fig, axes = plt.subplots(1, n_panels, figsize=(4 * n_panels, 3.5), squeeze=False)
    edges = np.linspace(0, 1, HISTOGRAM_BINS + 1)
    for name, report in reports.items():
        kind = " (frequency pseudo-groups)" if report["pseudo_groups"] else ""
        for ax, group in zip(axes[0], report["groups"]):
            counts = np.asarray(group["p_parent_histogram"], dtype=float)
            ax.stairs(counts / max(counts.sum(), 1), edges, label=f"{name}{kind}: {group['hierarchy_share']:.2f}")
            ax.set_title(f"group {group['group']}: P(parent fires | latent fires)")
    for ax in axes[0]:
        ax.axvline(next(iter(reports.values()))["threshold"], color="grey", linestyle=":")
        ax.set_xlabel("P(parent | child), best parent in earlier groups")
        ax.set_ylabel("share of the group's latents")
        ax.legend(fontsize=7, title="share at the threshold", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- evaluation and training on the toy
@torch.no_grad()
def toy_report(model: MatryoshkaTranscoder, store: ToyHierarchyStore, group_sizes: list[int] | None = None,
               n_tokens: int = 16_384) -> dict:
    """Every metric of a transcoder trained on the toy, on held-out tokens. `group_sizes`: the groups the hierarchy
    statistics cut the latents into; None uses the model's own prefix groups, and a plain transcoder gets
    pseudo-groups of the given sizes with its latents ordered by firing frequency. Latents are the inference ones
    (JumpReLU at the calibrated threshold); the FVU of prefix g keeps the first m_g of them."""
    f, x, y = store.held_out(n_tokens)
    cfg, parent_of = model.cfg, store.tree.parent_of
    z = model.encode(x.to(model.W_enc.device, model.W_enc.dtype)).float().cpu()
    W_enc, W_dec = model.W_enc.detach().float().cpu(), model.W_dec.detach().float().cpu()
    fvus = [float(fvu(y, z[:, :m] @ W_dec[:m] + model.b_dec.detach().float().cpu())) for m in cfg.prefix_sizes]
    enc_cos, dec_cos = recovery(store.A, store.B, W_enc, W_dec)
    match, match_cos = match_features(store.B, W_dec)
    absorption = absorption_rates(f > 0, z > 0, parent_of, match)
    contam = contamination(store.B, W_dec, parent_of, match)
    groups = latent_groups(match, cfg.prefix_sizes)
    cofiring = CoFiring(cfg.d_sae)
    cofiring.update(z)
    own_groups = group_sizes is None or group_sizes == cfg.group_sizes
    tree = hierarchy(cofiring, cfg.group_sizes if own_groups else group_sizes, W_dec,
                     order=None if own_groups else cofiring.frequency_order())
    # the tree found: a true child's latent whose co-firing parent is the latent of its true parent
    found = dict(zip(tree.latents.tolist(), tree.parents.tolist()))
    is_child = parent_of >= 0
    tree_found = [found.get(int(match[c])) == int(match[parent_of[c]]) for c in is_child.nonzero().squeeze(1)]
    return {
        "fvu": fvus[-1], "fvu_per_prefix": fvus, "l0": float((z > 0).float().sum(1).mean()),
        "absorption_rate": float(absorption.nanmean()), "contamination": float(contam.mean()),
        "recovery_enc": float(enc_cos.mean()), "recovery_dec": float(dec_cos.mean()),
        "recovery_dec_parents": float(dec_cos[~is_child].mean()),
        "recovery_dec_children": float(dec_cos[is_child].mean()),
        "parents_in_first_group": float((groups[~is_child] == 0).float().mean()),
        "matched_per_group": [{"parents": int((groups[~is_child] == g).sum()),
                               "children": int((groups[is_child] == g).sum())} for g in range(cfg.n_prefixes)],
        "distinct_latents_matched": len(set(match.tolist())) / len(match),
        "tree_found": sum(tree_found) / len(tree_found), **tree.summary(),
        "per_feature": {"parent": parent_of.tolist(), "latent": match.tolist(), "group": groups.tolist(),
                        "decoder_cos": match_cos.tolist(), "encoder_recovery": enc_cos.tolist()},
        "absorption_per_parent": absorption.tolist(), "contamination_per_child": contam.tolist(),
    }


def toy_config(run_name: str, output_dir: str | Path, store: ToyHierarchyStore, d_sae: int, prefix_sizes: list[int],
               k: int, total_tokens: int, **changes) -> TranscoderConfig:
    """A config for a quick CPU run on the toy: no W&B, no mirror, no samples, one checkpoint at the end, dead
    latents after 20 batches without firing."""
    steps = total_tokens // store.batch_size
    base = dict(d_in=store.A.shape[1], d_out=store.B.shape[1], d_sae=d_sae, prefix_sizes=prefix_sizes, k=k,
                k_aux=max(1, d_sae // 2), batch_size=store.batch_size, total_tokens=total_tokens, lr=3e-3,
                min_lr=3e-4, warmup_steps=min(50, steps), dead_after_tokens=20 * store.batch_size,
                calibration_tokens=8 * store.batch_size, log_every=max(1, steps // 10), checkpoint_every=steps,
                keep_checkpoints=1, output_dir=str(output_dir), run_name=run_name, wandb_mode="disabled",
                drive_dir="none", samples_every=0, dataset="toy-hierarchy", model_name="toy-hierarchy",
                device="cpu", seed=store.seed)
    return TranscoderConfig(**{**base, **changes})


def train_toy(cfg: TranscoderConfig, store: ToyHierarchyStore) -> MatryoshkaTranscoder:
    """Train one transcoder on the toy with the real `Trainer`; returns it in raw units, as `final/` holds it."""
    from .train import Trainer

    trainer = Trainer([cfg], store, device="cpu", resume="never", progress=False)
    trainer.train()
    return trainer.runs[0].model


def compare_on_toy(output_dir: str | Path, d_in: int = 128, d_out: int = 112, tree: FeatureTree = FeatureTree(),
                   prefix_sizes: list[int] | None = None, k: int = 3, batch_size: int = 1024,
                   total_tokens: int = 1024 * 1500, seed: int = 0, n_eval: int = 16_384,
                   matryoshka: dict | None = None, **changes) -> dict[str, dict]:
    """Plain BatchTopK and Matryoshka at equal width, k and budget on the same toy batches; returns both reports.
    Default groups: one latent per parent, then one per child. `changes` go to both configs, `matryoshka` to the
    Matryoshka one only (e.g. `{"prefix_weights": [1, 1]}`: equal weights, which absorb less than plain but cost
    FVU; mtc's default 1:3 meets the goal, see benchmarks/toy_hierarchy.py --sweep). The plain report's hierarchy statistics use pseudo-groups of the
    Matryoshka's group sizes."""
    prefix_sizes = prefix_sizes or [tree.n_parents, tree.n_features]
    group_sizes = [m - prev for prev, m in zip([0, *prefix_sizes[:-1]], prefix_sizes)]
    runs = {"plain": ([prefix_sizes[-1]], changes), "matryoshka": (prefix_sizes, {**changes, **(matryoshka or {})})}
    reports = {}
    for name, (sizes, run_changes) in runs.items():
        store = ToyHierarchyStore(d_in, d_out, batch_size, tree, seed)  # the same batches for each
        cfg = toy_config(f"{name}-seed{seed}", output_dir, store, prefix_sizes[-1], sizes, k, total_tokens,
                         **run_changes)
        reports[name] = toy_report(train_toy(cfg, store), store, group_sizes, n_eval)
    return reports
