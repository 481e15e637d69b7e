"""One optimisation step of a transcoder, its optimiser and its learning-rate schedule:

    loss -> backward -> (data parallel: sum the ranks' gradients) -> drop the decoder-parallel gradient
    -> clip -> optimiser step at the scheduled rate -> unit-norm decoder rows

Two optimisers (`cfg.optimizer`):

- "adam": Adam, linear warmup, cosine decay to `min_lr`;
- "signsgd": schedule-free sign descent (EleutherAI sparsify's default): the base iterate takes steps of
  `lr * sign(grad)`, the weights kept are its running average, and gradients are taken at a point between
  the two. The rate stays at `lr` after the warmup; the averaging does what a decay would.

Pure functions of the model, the optimiser and a batch; the `Trainer` (`mtc.train`) calls them.
"""

from __future__ import annotations

import copy
import math

import torch

from .config import TranscoderConfig
from .parallel import LOCAL, BatchReduction
from .transcoder import MatryoshkaTranscoder, TrainingOutput


SCHEDULE_FREE_MOMENTUM = 0.95  # where gradients are taken: 0.95 of the way from the iterate to the average


def learning_rate(step: int, cfg: TranscoderConfig) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay reaching `min_lr` at the last step
    (schedule-free sign descent stays at `lr`)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.optimizer == "signsgd":
        return cfg.lr
    decay_steps = max(1, cfg.total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


class ScheduleFreeSignSGD(torch.optim.Optimizer):
    """Schedule-free sign descent (Defazio et al. 2024, "The Road Less Scheduled", over SignSGD). Per parameter:

        z <- z - lr * sign(grad)                       the base iterate; rows of `unit_rows` tensors renormalised
        x <- x + c_t * (z - x),  c_t = lr_t^2 / sum_s lr_s^2     the average: the weights to keep
        p  = momentum * x + (1 - momentum) * z          where the next gradient is taken

    The parameters hold `p` while training; `averaged()` gives `x`. The state (`z`, `x`, the weight sum) is
    in `state_dict()`, so a resumed run continues exactly."""

    def __init__(self, params, lr: float, momentum: float = SCHEDULE_FREE_MOMENTUM, unit_rows: tuple = ()):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_sum=0.0))
        self._unit_rows = {id(p) for p in unit_rows}

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            group["weight_sum"] += group["lr"] ** 2
            average_weight = group["lr"] ** 2 / group["weight_sum"] if group["weight_sum"] > 0 else 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["z"], state["x"] = p.detach().clone(), p.detach().clone()
                z, x = state["z"], state["x"]
                z.add_(p.grad.sign(), alpha=-group["lr"])
                if id(p) in self._unit_rows:  # a row: one latent's decoders (over all its targets, for a CLT)
                    z.div_(z.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (z.ndim - 1)))
                x.lerp_(z, average_weight)
                p.copy_(x).lerp_(z, 1 - group["momentum"])

    @torch.no_grad()
    def averaged(self) -> dict[torch.nn.Parameter, torch.Tensor]:
        """The averaged weights `x` of every parameter that has taken a step."""
        return {p: self.state[p]["x"] for group in self.param_groups for p in group["params"] if self.state[p]}


def make_optimizer(model: MatryoshkaTranscoder, cfg: TranscoderConfig) -> torch.optim.Optimizer:
    """Adam over the transcoder's parameters, the fused kernel (one pass over each tensor instead of a
    dozen) where torch has it, CPU and CUDA; or schedule-free sign descent."""
    params = model.parameter_groups()
    if cfg.optimizer == "signsgd":
        return ScheduleFreeSignSGD(params, lr=cfg.lr, unit_rows=model.unit_norm_decoders())
    fused = model.b_dec.device.type in ("cpu", "cuda")
    return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas, fused=fused)


def weights_to_keep(model: MatryoshkaTranscoder, optimizer: torch.optim.Optimizer) -> MatryoshkaTranscoder:
    """The model a checkpoint or `final/` should hold: `model` itself, or, for schedule-free sign descent, a copy
    with the averaged weights (the ones it is trained to make good)."""
    if not isinstance(optimizer, ScheduleFreeSignSGD):
        return model
    kept = copy.deepcopy(model)
    averaged = optimizer.averaged()
    with torch.no_grad():
        for p, q in zip(model.parameters(), kept.parameters()):
            if p in averaged:
                q.copy_(averaged[p])
    return kept


def train_step(model: MatryoshkaTranscoder, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               lr: float, reduction: BatchReduction = LOCAL) -> TrainingOutput:
    """One optimiser step on a batch: loss, backward, drop the decoder-parallel gradient, clip, a step at
    `lr`, unit-norm decoder rows. Raises `FloatingPointError` (before touching the weights) when the
    loss is not finite."""
    out = model.training_forward(x, y, reduction=reduction)
    if not torch.isfinite(out.reported_loss):
        raise FloatingPointError("non-finite loss")
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    reduction.sum_gradients(model.parameters())  # data-parallel: each rank's gradient is its part of the batch's
    model.remove_parallel_decoder_grad()
    torch.nn.utils.clip_grad_norm_(model.parameters(), model.cfg.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.step()
    if not isinstance(optimizer, ScheduleFreeSignSGD):  # that one keeps its own iterate's rows at unit norm
        model.normalize_decoder()
    return out
