"""Exports to the formats other interpretability tools read."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .transcoder import MatryoshkaTranscoder


def export_gemma_scope(model: MatryoshkaTranscoder, path: str | Path) -> Path:
    """Write a Gemma Scope `params.npz` (JumpReLU transcoder): `W_enc [d_in, d_sae]`,
    `W_dec [d_sae, d_out]`, `b_enc`, `b_dec` and `threshold` as a per-latent array.

    The prefix structure needs no extra data: prefix g is the first `prefix_sizes[g-1]` latents.
    """
    if model.W_skip is not None:
        raise ValueError("the Gemma Scope format has no skip path (W_skip); train with "
                         "skip_connection=False or save with mtc.save instead")
    path = Path(path)
    if path.suffix != ".npz":
        path = path / "params.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(model, name).detach().float().cpu().numpy()
              for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    arrays["threshold"] = np.full(model.cfg.d_sae, float(model.threshold), dtype=np.float32)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path
