"""The Matryoshka transcoder: nested-prefix BatchTopK in training, JumpReLU at inference.

    a      = relu(x @ W_enc + b_enc)                      pre-activations
    z      = BatchTopK(a, k)          (training)          keep the k*B largest entries of the batch
    z      = a * (a > threshold)      (inference)         JumpReLU with the learned threshold
    y_hat_g = z[:, :m_g] @ W_dec[:m_g] + b_dec (+ x @ W_skip)   one reconstruction per prefix g
    loss   = sum_g w_g * FVU(y, y_hat_g) + aux_coeff * AuxK

The pure maths (`batch_topk`, `decode_prefixes`, `fvu`, `aux_k_loss`) are plain functions on tensors;
`MatryoshkaTranscoder` holds the parameters and the training-time statistics (threshold estimate,
firing counters) and composes them. Training uses the faster, equivalent kernels of `mtc.kernels` by
default; the functions here are the reference. Every sum, mean and selection over "the batch" goes
through a `mtc.parallel.BatchReduction`: the plain computation in one process, the whole batch's when
ranks each hold a share of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from .config import TranscoderConfig, default_prefix_weights, torch_dtype
from .kernels import SelectedPreActivations, aux_k_indices, decode_prefixes_sparse, nested_sums
from .parallel import LOCAL, BatchReduction


# A latent silent this long is dead whatever the AuxK window (`dead_after_tokens`): the trainer's dead share.
DEAD_SHARE_TOKENS = 100_000


# ---------------------------------------------------------------------- pure maths
def prefix_size(cfg: TranscoderConfig, prefix: int | None) -> int:
    """The number of latents prefix `prefix` (a group count, 1-based; None: all) uses."""
    if prefix is None:
        return cfg.d_sae
    if not 1 <= prefix <= cfg.n_prefixes:
        raise ValueError(f"prefix must be between 1 and {cfg.n_prefixes} (number of groups), got {prefix}")
    return cfg.prefix_sizes[prefix - 1]


def batch_topk(pre_acts: Float[Tensor, "batch d_sae"], k: int) -> tuple[Tensor, Tensor]:
    """Keep the `k * batch` largest entries over the whole batch, zero the rest.

    Returns the sparse activations (dense layout) and the smallest positive kept value, the
    quantity whose running average becomes the inference threshold.
    """
    flat = pre_acts.flatten()
    n_keep = min(k * pre_acts.shape[0], flat.numel())
    values, indices = flat.topk(n_keep, sorted=False)
    z = torch.zeros_like(flat).scatter(0, indices, values).view_as(pre_acts)
    smallest_kept = torch.where(values > 0, values, torch.inf).min().detach()
    return z, smallest_kept


def decode_prefixes(
    z: Float[Tensor, "batch d_sae"],
    W_dec: Float[Tensor, "d_sae d_out"],
    b_dec: Float[Tensor, " d_out"],
    prefix_sizes: list[int],
) -> Float[Tensor, "prefix batch d_out"]:
    """All nested reconstructions for the cost of one decode: each group's slice is decoded once
    and the prefix outputs are the cumulative sums of the group outputs."""
    group_sizes = [m - prev for prev, m in zip([0, *prefix_sizes[:-1]], prefix_sizes)]
    # split (not slicing) so that backward concatenates the group gradients once
    group_outputs = torch.stack([z_g @ W_g for z_g, W_g in zip(z.split(group_sizes, dim=1),
                                                               W_dec.split(group_sizes, dim=0))])
    return nested_sums(group_outputs) + b_dec


def fvu(y: Float[Tensor, "batch d"], y_hat: Float[Tensor, "*prefix batch d"],
        reduction: BatchReduction = LOCAL) -> Tensor:
    """Fraction of variance unexplained, `sum((y - y_hat)^2) / sum((y - mean_batch(y))^2)`.
    A leading prefix dimension on `y_hat` gives one FVU per prefix. With a share of the batch
    (`reduction` over ranks) it is this share's part of the batch's FVU: the parts sum to it."""
    return (y - y_hat).pow(2).sum(dim=(-2, -1)) / reduction.total_variance(y)


def straight_through_relu(t: Tensor) -> Tensor:
    """`relu(t)` forwards, the identity's gradient backwards."""
    return t - (t - t.relu()).detach()


def aux_k_loss(
    linear: Float[Tensor, "batch d_sae"],
    dead_mask: Float[Tensor, " d_sae"],
    k_aux: int,
    W_dec: Float[Tensor, "d_sae d_out"],
    residual: Float[Tensor, "batch d_out"],
) -> Tensor:
    """AuxK: reconstruct the (detached) residual from the `k_aux` largest dead pre-activations
    of each token, decoded without bias; normalised by the residual's variance. Zero when no
    latent is dead.

    `linear` is `x @ W_enc + b_enc` before the ReLU. The picks are the largest dead pre-activations
    (ranked before the ReLU, which only orders ties at zero) and their values are `relu(linear)`, as
    the brief defines them; the gradient goes straight through the ReLU. A latent dies when its
    pre-activations are negative on every token: with the ReLU's gradient AuxK could never revive it."""
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return linear.new_zeros(())
    candidates = torch.where(dead_mask, linear, -torch.inf)  # live latents can never be picked
    values, indices = candidates.topk(min(k_aux, n_dead), dim=-1, sorted=False)
    values = straight_through_relu(values)
    aux_reconstruction = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
    return fvu(residual, aux_reconstruction)


# ---------------------------------------------------------------------- the module
@dataclass
class TrainingOutput:
    """What one training forward pass returns. Tensors stay on the device (no host sync)."""

    loss: Tensor
    fvu_per_prefix: Tensor  # [G]
    aux_loss: Tensor
    l0: Tensor  # mean active latents per token
    n_dead: Tensor
    d_sae: int
    # the BatchTopK activations, detached: `values[i]` at `(tokens[i], latents[i])` of a `[n_tokens, d_sae]` batch
    active: tuple[Tensor, Tensor, Tensor] | None = None
    n_tokens: int = 0
    batch_loss: Tensor | None = None  # the whole batch's loss (with a share of the batch, `loss` is this share's part)

    @property
    def reported_loss(self) -> Tensor:
        return self.loss if self.batch_loss is None else self.batch_loss

    def dense_latents(self) -> Float[Tensor, "batch d_sae"]:
        """The BatchTopK activations as a dense `[tokens, d_sae]` tensor (for activation samples)."""
        tokens, latents, values = self.active
        dense = values.new_zeros(self.n_tokens, self.d_sae)
        dense[tokens, latents] = values
        return dense

    def metrics(self) -> dict[str, float]:
        """The brief's metric names as Python floats (this syncs with the device)."""
        per_prefix = self.fvu_per_prefix.detach().float().cpu()
        out = {"loss": float(self.reported_loss.detach()), "fvu": float(per_prefix[-1])}
        out.update({f"fvu/prefix_{g + 1}": float(v) for g, v in enumerate(per_prefix)})
        out.update(fvu_min=float(per_prefix.min()), fvu_mean=float(per_prefix.mean()),
                   fvu_max=float(per_prefix.max()), l0=float(self.l0), aux_loss=float(self.aux_loss),
                   dead=int(self.n_dead), dead_pct=100.0 * float(self.n_dead) / self.d_sae)
        return out


class MatryoshkaTranscoder(nn.Module):
    """A transcoder whose latents are nested in prefixes (see the module docstring for the maths).

    `prefix` arguments count groups: `prefix=g` uses the first `cfg.prefix_sizes[g - 1]` latents;
    `None` uses all of them. Inputs may be `[batch, d]` or `[batch, seq, d]`.
    """

    def __init__(self, cfg: TranscoderConfig, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        dtype = torch_dtype(cfg.dtype)
        kw = dict(device=device, dtype=dtype)
        W_dec = torch.randn(cfg.d_sae, cfg.d_out, **kw)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(torch.randn(cfg.d_in, cfg.d_sae, **kw) / cfg.d_in**0.5)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, **kw))
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out, **kw)) if cfg.skip_connection else None
        # 0 means "not estimated yet": the first training step sets it directly. Always float32: a 1%
        # moving-average update would vanish in bfloat16 rounding.
        self.register_buffer("threshold", torch.zeros((), device=device, dtype=torch.float32))
        # Firing counters are trainer state (saved with checkpoints), not weights.
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long, device=device),
                             persistent=False)
        weights = torch.tensor(cfg.prefix_weights or default_prefix_weights(cfg.n_prefixes), **kw)
        self.register_buffer("prefix_weights", weights / weights.sum(), persistent=False)

    # ------------------------------------------------------------------ input checks
    def _as_tokens(self, t: Tensor, width: int, name: str) -> Tensor:
        """Flatten `[..., width]` to `[tokens, width]`, with errors that say what was expected."""
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim not in (2, 3) or t.shape[-1] != width:
            raise ValueError(f"{name} must have shape [batch, {width}] or [batch, seq, {width}], "
                             f"got {list(t.shape)}")
        if t.dtype != self.W_enc.dtype and not torch.is_autocast_enabled(t.device.type):
            raise TypeError(f"{name} has dtype {t.dtype} but the transcoder's parameters are "
                            f"{self.W_enc.dtype}; convert with {name}.to({self.W_enc.dtype})")
        if t.device != self.W_enc.device:
            raise ValueError(f"{name} is on {t.device} but the transcoder is on {self.W_enc.device}; "
                             f"move it with {name}.to('{self.W_enc.device}')")
        return t.reshape(-1, width)

    def parameter_groups(self) -> list[dict]:  # the optimiser's: one group, at the schedule's rate
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    def unit_norm_decoders(self) -> tuple[Tensor, ...]:  # decoders whose rows (one per latent) have unit norm
        return (self.W_dec,)

    # ------------------------------------------------------------------ inference
    def pre_activations(self, x: Float[Tensor, "... d_in"], prefix: int | None = None) -> Tensor:
        m = prefix_size(self.cfg, prefix)
        return F.relu(self._as_tokens(x, self.cfg.d_in, "x") @ self.W_enc[:, :m] + self.b_enc[:m])

    def encode(self, x: Float[Tensor, "... d_in"], prefix: int | None = None) -> Float[Tensor, "... m"]:
        """JumpReLU latent activations (dense layout) of the first `prefix` groups."""
        a = self.pre_activations(x, prefix)
        # a scalar threshold, or a per-latent one (imported JumpReLU transcoders)
        threshold = self.threshold if self.threshold.ndim == 0 else self.threshold[:a.shape[-1]]
        return (a * (a > threshold)).reshape(*x.shape[:-1], a.shape[-1])

    def decode(self, z: Float[Tensor, "... m"], prefix: int | None = None) -> Float[Tensor, "... d_out"]:
        """Reconstruction from the first `prefix` groups of latents (the skip path is not included:
        it needs `x`, see `forward`)."""
        m = prefix_size(self.cfg, prefix)
        if z.shape[-1] < m:
            raise ValueError(f"z has {z.shape[-1]} latents but prefix {prefix} needs the first {m}")
        flat = z.reshape(-1, z.shape[-1])[:, :m]
        return (flat @ self.W_dec[:m] + self.b_dec).reshape(*z.shape[:-1], self.cfg.d_out)

    def forward(self, x: Float[Tensor, "... d_in"], prefix: int | None = None) -> Float[Tensor, "... d_out"]:
        """Inference reconstruction of the target from the source activations."""
        y_hat = self.decode(self.encode(x, prefix), prefix)
        if self.W_skip is not None:
            y_hat = y_hat + x @ self.W_skip
        return y_hat

    def prefix_model(self, prefix: int) -> MatryoshkaTranscoder:
        """A standalone transcoder of the first `prefix` groups: its `forward(x)` is this model's
        `forward(x, prefix)`. Exports of a prefix are written from it."""
        m = prefix_size(self.cfg, prefix)
        weights = self.cfg.prefix_weights[:prefix] if self.cfg.prefix_weights else None
        cfg = self.cfg.replace(d_sae=m, prefix_sizes=self.cfg.prefix_sizes[:prefix], k=min(self.cfg.k, m),
                               prefix_weights=weights if weights and sum(weights) > 0 else None)
        model = type(self)(cfg, device=self.W_enc.device)
        state = {"W_enc": self.W_enc[:, :m], "b_enc": self.b_enc[:m], "W_dec": self.W_dec[:m], "b_dec": self.b_dec,
                 "threshold": self.threshold if self.threshold.ndim == 0 else self.threshold[:m]}
        if self.W_skip is not None:
            state["W_skip"] = self.W_skip
        model.load_state_dict({name: t.detach().clone() for name, t in state.items()})
        return model.train(self.training)

    # ------------------------------------------------------------------ training
    def training_forward(self, x: Float[Tensor, "... d_in"], y: Float[Tensor, "... d_out"],
                         update_stats: bool = True, reduction: BatchReduction = LOCAL) -> TrainingOutput:
        """Loss and metrics of one batch. With `update_stats`, also moves the threshold estimate and
        the firing counters (call it once per optimiser step).

        `cfg.kernels="sparse"` selects entries without autograd and lets gradients reach only the
        selected entries (encoder and decoder); `"dense"` is the plain autograd reference. Both give
        the same loss and gradients. With `reduction` over ranks that each hold a share of the batch,
        BatchTopK, the FVUs, L0 and the statistics are those of the whole batch, and `loss` is this share's
        part of the batch's loss: the ranks' gradients sum to its gradient. The dense reference needs the
        whole batch in this process; a share of a batch always trains with the sparse kernels."""
        x = self._as_tokens(x, self.cfg.d_in, "x")
        y = self._as_tokens(y, self.cfg.d_out, "y")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must hold the same tokens, got {x.shape[0]} and {y.shape[0]}")
        dead_mask = self.tokens_since_fired >= self.cfg.dead_after_tokens
        if self.cfg.kernels == "dense" and reduction.whole_batch:
            y_hats, aux, (tokens, latents, values) = self._dense_losses(x, y, dead_mask)
        else:
            y_hats, aux, (tokens, latents, values) = self._sparse_losses(x, y, dead_mask, reduction)
        fvu_per_prefix = fvu(y, y_hats, reduction)
        main = (fvu_per_prefix * self.prefix_weights).sum()

        values = values.detach()
        firing = values > 0
        n_tokens = reduction.count(x)
        if update_stats:
            smallest_kept = torch.where(firing, values, torch.inf).min() if len(values) else values.new_tensor(torch.inf)
            fired = reduction.fired(latents[firing], self.cfg.d_sae)
            self._update_stats(fired, n_tokens, reduction.min(smallest_kept))
        loss = main + self.cfg.aux_coeff * aux
        return TrainingOutput(
            loss=loss,
            fvu_per_prefix=reduction.sum(fvu_per_prefix.detach()),
            aux_loss=reduction.sum(aux.detach()),
            l0=reduction.sum(firing.sum()) / n_tokens,
            n_dead=dead_mask.sum(),
            d_sae=self.cfg.d_sae,
            active=(tokens, latents, values),
            n_tokens=x.shape[0],
            batch_loss=reduction.sum(loss.detach()),
        )

    def _encoder_matmul(self, x: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
        """`x @ W (+ b)` in `cfg.compute_dtype` (bfloat16 on hardware that has it; the result stays in that
        dtype). Gradients reach the float32 parameters through the casts."""
        compute = torch_dtype(self.cfg.compute_dtype or self.cfg.dtype)
        out = x.to(compute) @ W.to(compute)
        return out if b is None else out + b.to(compute)

    def _sparse_losses(self, x: Tensor, y: Tensor, dead_mask: Tensor, reduction: BatchReduction = LOCAL):
        with torch.no_grad():
            pre_acts = self._encoder_matmul(x, self.W_enc, self.b_enc)
        aux_tokens, aux_latents = aux_k_indices(pre_acts, dead_mask, self.cfg.k_aux)  # ranked before the ReLU
        pre_acts.relu_()
        tokens, latents = reduction.batch_topk(pre_acts, self.cfg.k)
        # one autograd node for both selections: an entry picked twice gets both gradients, as in dense
        both = SelectedPreActivations.apply(pre_acts, x, self.W_enc, self.b_enc, torch.cat([tokens, aux_tokens]),
                                            torch.cat([latents, aux_latents]), len(tokens))
        values, aux_values = both.split([len(tokens), len(aux_tokens)])
        y_hats = decode_prefixes_sparse(tokens, latents, values, x.shape[0], self.W_dec, self.b_dec,
                                        self.cfg.prefix_sizes)
        if self.W_skip is not None:
            y_hats = y_hats + self._encoder_matmul(x, self.W_skip).to(y_hats.dtype)
        if reduction.count(aux_tokens) == 0:
            return y_hats, x.new_zeros((), dtype=self.W_dec.dtype), (tokens, latents, values)
        per_token = aux_values.view(x.shape[0], -1) if len(aux_values) else aux_values.view(0, 0)
        if len(aux_values) == 0:  # this share of the batch holds no token
            aux_reconstruction = self.W_dec.new_zeros(0, self.cfg.d_out)
        elif per_token.shape[1] > self.cfg.d_sae // 16:
            # AuxK over a large share of the latents (small models, many dead): a dense matrix product
            # beats gathering rows (measured: 21 vs 38 ms for 512 tokens x 256 of 2560 latents on CPU).
            dense = per_token.new_zeros(x.shape[0], self.cfg.d_sae).index_put((aux_tokens, aux_latents), aux_values)
            aux_reconstruction = dense @ self.W_dec
        else:
            aux_reconstruction = F.embedding_bag(aux_latents.view_as(per_token), self.W_dec,
                                                 per_sample_weights=per_token, mode="sum")
        aux = fvu((y - y_hats[-1]).detach(), aux_reconstruction, reduction)
        return y_hats, aux, (tokens, latents, values)

    def _dense_losses(self, x: Tensor, y: Tensor, dead_mask: Tensor):
        linear = self._encoder_matmul(x, self.W_enc, self.b_enc).to(self.W_enc.dtype)
        z, _ = batch_topk(F.relu(linear), self.cfg.k)
        y_hats = decode_prefixes(z, self.W_dec, self.b_dec, self.cfg.prefix_sizes)
        if self.W_skip is not None:
            y_hats = y_hats + self._encoder_matmul(x, self.W_skip).to(y_hats.dtype)
        aux = aux_k_loss(linear, dead_mask, self.cfg.k_aux, self.W_dec, (y - y_hats[-1]).detach())
        tokens, latents = z.detach().nonzero(as_tuple=True)
        return y_hats, aux, (tokens, latents, z[tokens, latents])

    @torch.no_grad()
    def _update_stats(self, fired_latents: Tensor, n_tokens: int, smallest_kept: Tensor) -> None:
        if torch.isfinite(smallest_kept):
            m = self.cfg.threshold_momentum
            first = self.threshold == 0
            self.threshold.copy_(torch.where(first, smallest_kept, m * self.threshold + (1 - m) * smallest_kept))
        self.tokens_since_fired.add_(n_tokens).index_fill_(0, fired_latents, 0)

    @torch.no_grad()
    def init_from_batch(self, x: Float[Tensor, "... d_in"], y: Float[Tensor, "... d_out"]) -> None:
        """Data-dependent start, called once on a first batch before training:

        - `b_dec` = the targets' mean;
        - each encoder column is rescaled so its latent's pre-activation has unit variance on the batch;
        - `b_enc = -mean(x) @ W_enc`, centring every pre-activation on the data;
        - with `decoder_init="batch"`, each selected latent's decoder row is its tokens' mean centred target.

        Language-model activations share a large mean direction and are very anisotropic; without this,
        the latents that happen to align with the mean or the high-variance directions win every
        BatchTopK selection from the first step and most others never fire."""
        x = self._as_tokens(x, self.cfg.d_in, "x")
        y = self._as_tokens(y, self.cfg.d_out, "y")
        centred = x - x.mean(0)
        self.W_enc.div_((centred @ self.W_enc).std(0).clamp_min(1e-6))
        self.b_enc.copy_(-(x.mean(0) @ self.W_enc))
        self.b_dec.copy_(y.mean(0))
        if self.cfg.decoder_init == "batch":
            # each latent starts writing what the targets of its tokens share, as a decoder starting from zero
            # learns in its first step (sparsify's transcoder init), but at unit norm
            z, _ = batch_topk(F.relu(centred @ self.W_enc), self.cfg.k)
            rows = z.T.to(y.dtype) @ (y - self.b_dec)
            selected = rows.norm(dim=1) > 0
            self.W_dec[selected] = rows[selected] / rows[selected].norm(dim=1, keepdim=True)

    @torch.no_grad()
    def calibrate_threshold(self, sources: list[Float[Tensor, "batch d_in"]]) -> float:
        """Set the JumpReLU threshold so that on `sources` the latents fire exactly `k` times per token on
        average, as BatchTopK did in training; returns it.

        The running average of the smallest kept value lags the weights and lets more latents through
        than `k` (L0 36.6 for k 32 on the demo): here the threshold is the `(k * N + 1)`-th largest
        pre-activation over all `N` tokens. Each batch contributes at most its `4 * k * batch` largest
        values, far more than a typical batch's share."""
        pooled, n_tokens = [], 0
        for x in sources:
            a = self.pre_activations(x).flatten()
            n_tokens += x.shape[0]
            pooled.append(a.topk(min(4 * self.cfg.k * x.shape[0], a.numel()), sorted=False).values.float())
        values = torch.cat(pooled)
        n_fire = self.cfg.k * n_tokens
        threshold = values.topk(n_fire + 1).values[-1] if n_fire < values.numel() else values.new_zeros(())
        self.threshold.copy_(threshold.clamp_min(0))
        return float(self.threshold)

    # ------------------------------------------------------------------ decoder-norm constraint
    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each decoder row (call before the optimiser step)."""
        if self.W_dec.grad is None:
            return
        parallel = torch.linalg.vecdot(self.W_dec.grad, self.W_dec).unsqueeze(1)
        self.W_dec.grad.addcmul_(parallel, self.W_dec, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit L2 norm (call after the optimiser step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
