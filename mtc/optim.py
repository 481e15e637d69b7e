"""One optimisation step of a transcoder, and its learning-rate schedule:

    loss -> backward -> (data parallel: sum the ranks' gradients) -> drop the decoder-parallel gradient
    -> clip -> Adam at the scheduled rate -> renormalise decoder rows

Pure functions of the model, the optimiser and a batch; the `Trainer` (`mtc.train`) calls them.
"""

from __future__ import annotations

import math

import torch

from .config import TranscoderConfig
from .parallel import LOCAL, BatchReduction
from .transcoder import MatryoshkaTranscoder, TrainingOutput


def learning_rate(step: int, cfg: TranscoderConfig) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay reaching `min_lr` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: MatryoshkaTranscoder, cfg: TranscoderConfig) -> torch.optim.Adam:
    """Adam over the transcoder's parameters; the fused kernel (one pass over each tensor instead of a
    dozen) where torch has it, CPU and CUDA."""
    fused = model.W_enc.device.type in ("cpu", "cuda")
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, fused=fused)


def train_step(model: MatryoshkaTranscoder, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               lr: float, reduction: BatchReduction = LOCAL) -> TrainingOutput:
    """One optimiser step on a batch: loss, backward, drop the decoder-parallel gradient, clip, Adam at
    `lr`, renormalise decoder rows. Raises `FloatingPointError` (before touching the weights) when the
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
        group["lr"] = lr
    optimizer.step()
    model.normalize_decoder()
    return out
