"""The Matryoshka cross-layer transcoder (CLT): the latents of layer l read that layer's source hook and write to
the targets of every layer l' >= l.

    a_l       = relu(x_l @ W_enc[l] + b_enc[l])                    one encoder per layer
    z_l       = BatchTopK(a_l, k)     (training, per layer)        keep the k*B largest entries of layer l
    z_l       = a_l * (a_l > threshold[l])   (inference)           JumpReLU, one threshold per layer
    y_hat_g,l' = sum_{l <= l'} z_l[:, :m_g] @ W_dec[l][:m_g, l'-l] + b_dec[l']     prefix g, target l'
    loss      = sum_g w_g * mean_l' FVU(y_l', y_hat_g,l') + aux_coeff * AuxK

`W_dec[l]` is `[d_sae, n_layers - l, d_out]`, circuit-tracer's layout: row i holds latent i's decoders to
layer l and every later one, and its norm over all of them is kept at 1 (the transcoder's unit-norm rows, taken
jointly over the targets a latent writes to). BatchTopK runs per layer, so every layer keeps on average k latents
per token, as a per-layer set does; that keeps the two comparable at equal L0 and lets each layer's threshold be
calibrated as a transcoder's is. AuxK lets each layer's dead latents reconstruct the residual of the targets
they write to. Inputs are the layers' activations stacked as `[batch, n_layers, d]`.

The training kernels are `mtc.kernels`' (per layer); the maths read top to bottom in `training_forward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from .config import TranscoderConfig, default_prefix_weights, torch_dtype
from .kernels import SelectedPreActivations, aux_k_indices, batch_topk_indices, decode_prefixes_sparse
from .transcoder import MatryoshkaTranscoder, TrainingOutput, prefix_size


class CrossLayerTranscoder(nn.Module):
    """A CLT over the layers `cfg.clt_layers` (see the module docstring). `prefix=g` uses the first
    `cfg.prefix_sizes[g - 1]` latents of every layer; `None` all of them."""

    def __init__(self, cfg: TranscoderConfig, device: torch.device | str | None = None):
        super().__init__()
        if not cfg.clt_layers:
            raise ValueError("CrossLayerTranscoder needs cfg.clt_layers (the layers it spans)")
        self.cfg = cfg
        n, kw = len(cfg.clt_layers), dict(device=device, dtype=torch_dtype(cfg.dtype))
        self.W_enc = nn.ParameterList(torch.randn(cfg.d_in, cfg.d_sae, **kw) / cfg.d_in**0.5 for _ in range(n))
        self.b_enc = nn.ParameterList(torch.zeros(cfg.d_sae, **kw) for _ in range(n))
        # the CLT starts as a set of transcoders: each latent writes to its own layer, its later decoders at zero
        self.W_dec = nn.ParameterList(_unit_rows(torch.cat([torch.randn(cfg.d_sae, 1, cfg.d_out, **kw),
                                                            torch.zeros(cfg.d_sae, n - layer - 1, cfg.d_out, **kw)], 1))
                                      for layer in range(n))
        self.b_dec = nn.Parameter(torch.zeros(n, cfg.d_out, **kw))
        # per latent, as circuit-tracer stores it (mtc sets one value per layer; imported CLTs may differ)
        self.register_buffer("threshold", torch.zeros(n, cfg.d_sae, device=device, dtype=torch.float32))
        self.register_buffer("tokens_since_fired", torch.zeros(n, cfg.d_sae, dtype=torch.long, device=device),
                             persistent=False)
        weights = torch.tensor(cfg.prefix_weights or default_prefix_weights(cfg.n_prefixes), **kw)
        self.register_buffer("prefix_weights", weights / weights.sum(), persistent=False)

    @property
    def n_layers(self) -> int:
        return len(self.cfg.clt_layers)

    def parameter_groups(self) -> list[dict]:
        """The optimiser's parameter groups. Layer l's decoders learn at the rate divided by sqrt(N - l), the square
        root of the number of layers they write to: a step of `lr` on every entry (sign descent; Adam's steps are
        alike) then moves a latent's decoder row by as much as a transcoder's, whatever the number of targets."""
        decoders = [{"params": [W], "lr_scale": (self.n_layers - layer) ** -0.5} for layer, W in enumerate(self.W_dec)]
        return [{"params": [*self.W_enc, *self.b_enc, self.b_dec], "lr_scale": 1.0}, *decoders]

    def unit_norm_decoders(self) -> tuple[Tensor, ...]:
        """Each layer's decoders; a row (one latent's decoders over all its targets) is kept at unit norm."""
        return tuple(self.W_dec)

    def _check(self, t: Tensor, width: int, name: str) -> Tensor:
        """`[..., n_layers, width]` to `[tokens, n_layers, width]`, with errors that say what was expected."""
        if not isinstance(t, Tensor) or t.ndim < 2 or tuple(t.shape[-2:]) != (self.n_layers, width):
            raise ValueError(f"{name} must be the layers' activations stacked as [..., {self.n_layers}, {width}], "
                             f"got {list(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        return t.reshape(-1, self.n_layers, width)

    # ------------------------------------------------------------------ inference
    def pre_activations(self, x: Float[Tensor, "... n_layers d_in"], prefix: int | None = None) -> Tensor:
        m, x = prefix_size(self.cfg, prefix), self._check(x, self.cfg.d_in, "x")
        return torch.stack([F.relu(x[:, layer] @ W[:, :m] + b[:m])
                            for layer, (W, b) in enumerate(zip(self.W_enc, self.b_enc))], dim=1)

    def encode(self, x: Float[Tensor, "... n_layers d_in"], prefix: int | None = None) -> Tensor:
        """JumpReLU latents `[..., n_layers, m]` of the first `prefix` groups of every layer."""
        a = self.pre_activations(x, prefix)
        return (a * (a > self.threshold[:, :a.shape[-1]])).reshape(*x.shape[:-1], a.shape[-1])

    def decode(self, z: Float[Tensor, "... n_layers m"], prefix: int | None = None) -> Tensor:
        """Every target `[..., n_layers, d_out]` from the first `prefix` groups of every layer's latents."""
        m = prefix_size(self.cfg, prefix)
        flat = z.reshape(-1, self.n_layers, z.shape[-1])[..., :m]
        y_hat = self.b_dec.expand(flat.shape[0], -1, -1).clone()
        for layer, W in enumerate(self.W_dec):
            y_hat[:, layer:] += torch.einsum("tm,mjd->tjd", flat[:, layer], W[:m])
        return y_hat.reshape(*z.shape[:-1], self.cfg.d_out)

    def forward(self, x: Float[Tensor, "... n_layers d_in"], prefix: int | None = None) -> Tensor:
        return self.decode(self.encode(x, prefix), prefix)

    def encode_layer(self, x: Float[Tensor, "... d_in"], layer: int, prefix: int | None = None) -> Tensor:
        """The latents of the `layer`-th layer alone (its position in `clt_layers`) from its source activations."""
        m = prefix_size(self.cfg, prefix)
        a = F.relu(x @ self.W_enc[layer][:, :m] + self.b_enc[layer][:m])
        return a * (a > self.threshold[layer, :m])

    def decode_layer(self, latents: list[Tensor], layer: int, prefix: int | None = None) -> Tensor:
        """Target `layer` from `latents[i]`, the latents of every layer i <= `layer` (`encode_layer`'s)."""
        m = prefix_size(self.cfg, prefix)
        return sum(z[..., :m] @ self.W_dec[i][:m, layer - i] for i, z in enumerate(latents[:layer + 1])) \
            + self.b_dec[layer]

    def prefix_model(self, prefix: int) -> CrossLayerTranscoder:
        """A standalone CLT of the first `prefix` groups of every layer."""
        m = prefix_size(self.cfg, prefix)
        weights = self.cfg.prefix_weights[:prefix] if self.cfg.prefix_weights else None
        cfg = self.cfg.replace(d_sae=m, prefix_sizes=self.cfg.prefix_sizes[:prefix], k=min(self.cfg.k, m),
                               prefix_weights=weights if weights and sum(weights) > 0 else None)
        model = type(self)(cfg, device=self.b_dec.device)
        state = {name: t[..., :m] if name.startswith(("W_enc", "b_enc", "threshold")) else t[:m] if name.startswith("W_dec") else t
                 for name, t in self.state_dict().items()}
        model.load_state_dict({name: t.detach().clone() for name, t in state.items()})
        return model.train(self.training)

    # ------------------------------------------------------------------ training
    def training_forward(self, x: Float[Tensor, "batch n_layers d_in"], y: Float[Tensor, "batch n_layers d_out"],
                         update_stats: bool = True, reduction=None) -> TrainingOutput:
        """Loss and metrics of one batch (see the module docstring); with `update_stats` also the thresholds'
        moving averages and the firing counters. `fvu_per_prefix` is each prefix's FVU averaged over targets."""
        x, y = self._check(x, self.cfg.d_in, "x"), self._check(y, self.cfg.d_out, "y")
        n_tokens, cfg = x.shape[0], self.cfg
        dead = self.tokens_since_fired >= cfg.dead_after_tokens
        # each target's reconstruction is a sum over the layers that write to it; gathered per target and summed
        # once (in-place adds into slices of one tensor cost a full-size copy per layer in backward)
        to_target: list[list[Tensor]] = [[] for _ in range(self.n_layers)]
        aux_to_target: list[list[Tensor]] = [[] for _ in range(self.n_layers)]
        active, fired, smallest = [], [], []
        for layer in range(self.n_layers):
            W_enc, b_enc, W_dec = self.W_enc[layer], self.b_enc[layer], self.W_dec[layer].flatten(1)
            with torch.no_grad():
                pre_acts = x[:, layer] @ W_enc + b_enc
            aux_tokens, aux_latents = aux_k_indices(pre_acts, dead[layer], cfg.k_aux)  # ranked before the ReLU
            pre_acts.relu_()
            tokens, latents = batch_topk_indices(pre_acts, cfg.k)
            both = SelectedPreActivations.apply(pre_acts, x[:, layer], W_enc, b_enc, torch.cat([tokens, aux_tokens]),
                                                torch.cat([latents, aux_latents]), len(tokens))
            values, aux_values = both.split([len(tokens), len(aux_tokens)])
            decoded = decode_prefixes_sparse(tokens, latents, values, n_tokens, W_dec, 0.0, cfg.prefix_sizes)
            for j, part in enumerate(decoded.view(cfg.n_prefixes, n_tokens, -1, cfg.d_out).unbind(2)):
                to_target[layer + j].append(part)
            if len(aux_tokens):
                per_token = aux_values.view(n_tokens, -1)
                aux_decoded = F.embedding_bag(aux_latents.view_as(per_token), W_dec, mode="sum",
                                              per_sample_weights=per_token)
                for j, part in enumerate(aux_decoded.view(n_tokens, -1, cfg.d_out).unbind(1)):
                    aux_to_target[layer + j].append(part)
            kept = values.detach()
            active.append(int((kept > 0).sum()))
            fired.append(latents[kept > 0])
            smallest.append(kept[kept > 0].min() if (kept > 0).any() else kept.new_tensor(torch.inf))
        y_hats = torch.stack([sum(parts) for parts in to_target], dim=2) + self.b_dec
        variance = (y - y.mean(0)).pow(2).sum(dim=(0, 2))  # [n_layers]
        fvu = (y - y_hats).pow(2).sum(dim=(1, 3)) / variance  # [prefix, n_layers]
        main = (fvu.mean(1) * self.prefix_weights).sum()
        if dead.any():
            aux_hat = torch.stack([sum(parts) if parts else y.new_zeros(n_tokens, cfg.d_out) for parts in aux_to_target], 1)
            aux = ((y - y_hats[-1]).detach() - aux_hat).pow(2).sum(dim=(0, 2)).div(variance).mean()
        else:
            aux = y.new_zeros(())
        if update_stats:
            self._update_stats(fired, n_tokens, torch.stack(smallest))
        loss = main + cfg.aux_coeff * aux
        return TrainingOutput(loss=loss, fvu_per_prefix=fvu.detach().mean(1), aux_loss=aux.detach(),
                              l0=torch.tensor(sum(active) / (n_tokens * self.n_layers)), n_dead=dead.sum(),
                              d_sae=cfg.d_sae * self.n_layers, n_tokens=n_tokens)

    @torch.no_grad()
    def _update_stats(self, fired: list[Tensor], n_tokens: int, smallest_kept: Tensor) -> None:
        m, current = self.cfg.threshold_momentum, self.threshold[:, 0]
        moved = torch.where(current == 0, smallest_kept, m * current + (1 - m) * smallest_kept)
        self.threshold.copy_(torch.where(torch.isfinite(smallest_kept), moved, current)[:, None].expand_as(self.threshold))
        self.tokens_since_fired.add_(n_tokens)
        for layer, latents in enumerate(fired):
            self.tokens_since_fired[layer].index_fill_(0, latents, 0)

    @torch.no_grad()
    def init_from_batch(self, x: Float[Tensor, "batch n_layers d_in"], y: Float[Tensor, "batch n_layers d_out"]) -> None:
        """Each layer's encoder started as a transcoder's (`MatryoshkaTranscoder.init_from_batch`: unit-variance,
        centred pre-activations) and `b_dec` at the targets' means."""
        x, y = self._check(x, self.cfg.d_in, "x"), self._check(y, self.cfg.d_out, "y")
        for layer, (W, b) in enumerate(zip(self.W_enc, self.b_enc)):
            centred = x[:, layer] - x[:, layer].mean(0)
            W.div_((centred @ W).std(0).clamp_min(1e-6))
            b.copy_(-(x[:, layer].mean(0) @ W))
        self.b_dec.copy_(y.mean(0))

    @torch.no_grad()
    def calibrate_threshold(self, sources: list[Float[Tensor, "batch n_layers d_in"]]) -> list[float]:
        """Each layer's JumpReLU threshold set so that its latents fire `k` times per token on `sources`, as
        `MatryoshkaTranscoder.calibrate_threshold` does for one transcoder; returns them."""
        n_tokens = sum(self._check(x, self.cfg.d_in, "x").shape[0] for x in sources)
        n_fire = self.cfg.k * n_tokens
        for layer in range(self.n_layers):
            pooled = []
            for x in sources:
                a = self.pre_activations(x)[:, layer].flatten()
                pooled.append(a.topk(min(4 * self.cfg.k * (a.numel() // self.cfg.d_sae), a.numel()),
                                     sorted=False).values.float())
            values = torch.cat(pooled)
            threshold = values.topk(n_fire + 1).values[-1] if n_fire < values.numel() else values.new_zeros(())
            self.threshold[layer] = threshold.clamp_min(0)
        return self.threshold[:, 0].tolist()

    # ------------------------------------------------------------------ decoder-norm constraint
    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out, per latent, the gradient along its decoder (all of its targets together)."""
        for W in self.W_dec:
            if W.grad is not None:
                rows, grad = W.flatten(1), W.grad.flatten(1)
                grad.addcmul_(torch.linalg.vecdot(grad, rows).unsqueeze(1), rows, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        for W in self.W_dec:
            W.copy_(_unit_rows(W))


def _unit_rows(W: Float[Tensor, "d_sae targets d_out"]) -> Tensor:
    """`W` with each latent's decoders (over all its targets) scaled to unit norm together."""
    return W / W.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]


def build_model(cfg: TranscoderConfig, device: torch.device | str | None = None):
    """The model a config describes: a `CrossLayerTranscoder` when it names `clt_layers`, else a
    `MatryoshkaTranscoder`."""
    return CrossLayerTranscoder(cfg, device) if cfg.clt_layers else MatryoshkaTranscoder(cfg, device)
