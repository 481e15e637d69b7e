"""Dead-latent resampling: give latents that stopped firing a fresh start where the transcoder errs most.

Every `cfg.resample_every` steps, until 70% of the budget, each dead latent (no firing in the last
`dead_after_tokens` tokens) is re-initialised on one token `t` of the current batch, drawn with
probability proportional to its squared error `||y_t - y_hat_t||^2` (Anthropic's "resampling", 2023):

    W_dec[i] = r_t / ||r_t||                      it writes the error it was born on
    W_enc[:, i] = c_t / ||c_t||^2 * tau           reads that token's centred source, c_t = x_t - mean(x),
    b_enc[i] = -mean(x) @ W_enc[:, i]             centred, so its pre-activation on x_t is tau

where `tau` is the current estimate of the smallest activation BatchTopK keeps: a new latent starts at the
edge of firing on tokens like its own, not above every live latent. Its optimiser state is reset (Adam's moments set to zero; schedule-free sign descent's iterate and
average set to the new weights), so no stale momentum pushes it back. AuxK pulls dead latents towards
the error too, but through the same sparse gradients that killed them; resampling does not need them.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from .config import TranscoderConfig
from .optim import ScheduleFreeSignSGD
from .transcoder import MatryoshkaTranscoder

RESAMPLE_UNTIL = 0.7  # no resampling in the last 30% of the budget: new latents need steps to settle


def resampling_due(step: int, cfg: TranscoderConfig) -> bool:
    """Whether dead latents are resampled after `step` optimiser steps."""
    return bool(cfg.resample_every) and step % cfg.resample_every == 0 and step <= RESAMPLE_UNTIL * cfg.total_steps


@torch.no_grad()
def new_latent_weights(model: MatryoshkaTranscoder, x: Float[Tensor, "batch d_in"], y: Float[Tensor, "batch d_out"],
                       n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Weights for `n` resampled latents from a batch (in training units): `W_enc [d_in, n]`, `b_enc [n]`,
    `W_dec [n, d_out]`."""
    residual = y - model(x)
    error = residual.pow(2).sum(1)
    tokens = torch.multinomial(error / error.sum(), n, replacement=n > len(error), generator=generator)
    directions = x[tokens] - x.mean(0)
    tau = float(model.threshold) if float(model.threshold) > 0 else 1.0
    W_enc = (directions / directions.pow(2).sum(1, keepdim=True).clamp_min(1e-12) * tau).T
    W_dec = residual[tokens] / residual[tokens].norm(dim=1, keepdim=True).clamp_min(1e-12)
    return {"W_enc": W_enc, "b_enc": -(x.mean(0) @ W_enc), "W_dec": W_dec}


LATENT_DIM = {"W_enc": 1, "b_enc": 0, "W_dec": 0}  # the dimension of each parameter that indexes latents


@torch.no_grad()
def resample_dead(model: MatryoshkaTranscoder, optimizer: torch.optim.Optimizer, x: Float[Tensor, "batch d_in"],
                  y: Float[Tensor, "batch d_out"]) -> int:
    """Re-initialise every dead latent of `model` on the batch `(x, y)` and reset its optimiser state; returns
    how many were resampled."""
    dead = (model.tokens_since_fired >= model.cfg.dead_after_tokens).nonzero().flatten()
    if len(dead) == 0:
        return 0
    weights = new_latent_weights(model, x, y, len(dead))
    for name, value in weights.items():
        param = getattr(model, name)
        dim = LATENT_DIM[name]
        param.index_copy_(dim, dead, value.to(param.dtype))
        state = optimizer.state.get(param, {})
        if isinstance(optimizer, ScheduleFreeSignSGD):
            for key in ("z", "x"):
                if key in state:
                    state[key].index_copy_(dim, dead, value.to(param.dtype))
        else:
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].index_fill_(dim, dead, 0)
    model.tokens_since_fired[dead] = 0
    return len(dead)
