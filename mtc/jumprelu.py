"""The form foreign transcoders load as: JumpReLU with one threshold per latent (Gemma Scope, SAELens and
circuit-tracer all store it so), and the helpers every reader and writer of those formats shares."""

from __future__ import annotations

from typing import Any

import torch

from .checkpoint import check_state_matches
from .config import TranscoderConfig, torch_dtype
from .transcoder import MatryoshkaTranscoder


class JumpReLUTranscoder(MatryoshkaTranscoder):
    """A `MatryoshkaTranscoder` with one JumpReLU threshold per latent (`threshold [d_sae]`), the form
    Gemma Scope, SAELens and circuit-tracer store. `encode` broadcasts `a > threshold` unchanged."""

    def __init__(self, cfg: TranscoderConfig, device: torch.device | str | None = None):
        super().__init__(cfg, device=device)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=torch.float32, device=device))


def per_latent_threshold(model: MatryoshkaTranscoder) -> torch.Tensor:
    """The threshold as a `[d_sae]` tensor, whether the model stores a scalar or one per latent."""
    return model.threshold.detach().expand(model.cfg.d_sae).contiguous().cpu()


def detached_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().cpu()


def build_jumprelu(cfg: TranscoderConfig, tensors: dict[str, torch.Tensor], source: str,
                   device: torch.device | str | None) -> JumpReLUTranscoder:
    """A `JumpReLUTranscoder` holding `tensors` (our parameter names and shapes)."""
    model = JumpReLUTranscoder(cfg, device=device)
    dtype = torch_dtype(cfg.dtype)
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    check_state_matches(model, tensors, source=source)
    model.load_state_dict(tensors)
    return model.eval()


def foreign_config(mtc_config: dict[str, Any] | None, **fields: Any) -> TranscoderConfig:
    """Our own config when the file carries it (exports of ours), else one built from the format's
    fields. `k` only matters for training; it is capped so that small dictionaries validate."""
    if mtc_config:
        return TranscoderConfig.from_dict(mtc_config)
    fields.setdefault("k", min(TranscoderConfig.k, fields["d_sae"]))
    return TranscoderConfig(prefix_sizes=[fields["d_sae"]], **fields)
