"""Activation scaling: train in units that do not depend on the hooks' own units.

Gemma's post-normed MLP outputs have norms in the hundreds while its normalised MLP inputs sit near
sqrt(d). A transcoder initialised for unit-scale data then needs latent activations of order 100, a
few early latents win every BatchTopK slot and most never fire. So the trainer divides the source and
the target each by a per-hook scale estimated on the first batch (so that their mean norm becomes
sqrt(d)), trains in those units, and folds the scales back into the weights whenever a model is written:

    x_train = x / s_x,  y_train = y / s_y
    raw model: W_enc * (s_y / s_x), b_enc * s_y, threshold * s_y, b_dec * s_y, W_skip * (s_y / s_x),
               W_dec unchanged (its rows stay unit-norm; latents are measured in target units)

Checkpoints hold the folded (raw-unit) weights for readers and the training-unit weights in their
trainer state, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor


def mean_norm_scale(acts: Float[Tensor, "tokens d"]) -> float:
    """`mean(||a||) / sqrt(d)`: dividing by it makes the mean norm of `acts` equal to sqrt(d)."""
    mean_norm = float(acts.double().norm(dim=-1).mean())
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise ValueError(f"cannot estimate an activation scale from activations with mean norm {mean_norm}; "
                         "the hook's activations are all zero or non-finite")
    return mean_norm / math.sqrt(acts.shape[-1])


@dataclass(frozen=True)
class ActivationScales:
    """Per-hook divisors: the transcoder trains on `source / source` and `target / target`."""

    source: float = 1.0
    target: float = 1.0

    @classmethod
    def estimate(cls, x: Float[Tensor, "tokens d_in"], y: Float[Tensor, "tokens d_out"]) -> ActivationScales:
        return cls(source=mean_norm_scale(x), target=mean_norm_scale(y))

    @property
    def is_identity(self) -> bool:
        return self.source == 1.0 and self.target == 1.0

    def to_dict(self) -> dict[str, float]:
        return {"source": self.source, "target": self.target}

    @classmethod
    def from_dict(cls, data: dict | None) -> ActivationScales:
        """Scales saved with a checkpoint; checkpoints written before scaling existed trained in raw units."""
        return cls(**data) if data else cls()

    # ------------------------------------------------------------------ folding
    def factors(self) -> dict[str, float]:
        """What each saved tensor is multiplied by to go from training units to raw units."""
        ratio = self.target / self.source
        return {"W_enc": ratio, "b_enc": self.target, "threshold": self.target, "b_dec": self.target,
                "W_skip": ratio, "W_dec": 1.0}

    def fold(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A state dict in raw units from one in training units (new tensors; the input is untouched)."""
        factors = self.factors()
        return {name: t * factors[name] if factors.get(name, 1.0) != 1.0 else t for name, t in state.items()}

    def training_units(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return (x, y) if self.is_identity else (x / self.source, y / self.target)


@dataclass(frozen=True)
class LayerScales:
    """A cross-layer transcoder's divisors, one per layer for its sources and one for its targets (inputs stacked
    as `[batch, n_layers, d]`). Folding keeps each latent in training units, so a layer's latents and thresholds
    are unchanged: `W_enc[l] / s_x[l]`, `W_dec[l][:, j] * s_y[l + j]`, `b_dec[l] * s_y[l]`."""

    source: tuple[float, ...] = ()
    target: tuple[float, ...] = ()

    @classmethod
    def estimate(cls, x: Float[Tensor, "tokens n_layers d_in"], y: Float[Tensor, "tokens n_layers d_out"]) -> LayerScales:
        return cls(source=tuple(mean_norm_scale(x[:, layer]) for layer in range(x.shape[1])),
                   target=tuple(mean_norm_scale(y[:, layer]) for layer in range(y.shape[1])))

    @property
    def is_identity(self) -> bool:
        return all(s == 1.0 for s in (*self.source, *self.target))

    def to_dict(self) -> dict[str, list[float]]:
        return {"source": list(self.source), "target": list(self.target)}

    @classmethod
    def from_dict(cls, data: dict | None) -> LayerScales:
        return cls(tuple(data["source"]), tuple(data["target"])) if data else cls()

    def fold(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.is_identity:
            return dict(state)
        out = dict(state)
        for name, t in state.items():
            kind, _, layer = name.partition(".")
            if kind == "W_enc":
                out[name] = t / self.source[int(layer)]
            elif kind == "W_dec":
                out[name] = t * t.new_tensor(self.target[int(layer):])[None, :, None]
            elif kind == "b_dec":
                out[name] = t * t.new_tensor(self.target)[:, None]
        return out

    def training_units(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.is_identity:
            return x, y
        return x / x.new_tensor(self.source)[:, None], y / y.new_tensor(self.target)[:, None]


def scales_for(cfg) -> type[ActivationScales] | type[LayerScales]:
    """The scales of a run of `cfg` (a `TranscoderConfig`): per layer for a cross-layer transcoder."""
    return LayerScales if cfg.clt_layers else ActivationScales
