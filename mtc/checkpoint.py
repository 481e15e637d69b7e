"""Saving and loading transcoder weights: `model.safetensors` + `config.json` in one folder.

Files are written under a temporary name and renamed into place, so an interrupted save never
leaves a half-written file where a good one was.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import TranscoderConfig
from .transcoder import MatryoshkaTranscoder

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(model: MatryoshkaTranscoder, path: str | Path) -> Path:
    """Write `model.safetensors` (parameters and threshold) and `config.json` into folder `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "mtc"})
    os.replace(tmp, path / WEIGHTS_FILE)
    atomic_write_bytes(path / CONFIG_FILE, (model.cfg.to_json() + "\n").encode())
    return path


def load(path: str | Path, device: torch.device | str | None = None) -> MatryoshkaTranscoder:
    """Rebuild a transcoder from a folder written by `save` (or a run's `final/` folder)."""
    path = Path(path)
    weights_path, config_path = path / WEIGHTS_FILE, path / CONFIG_FILE
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} is missing; `mtc.load` expects a folder written by `mtc.save` "
                                    f"holding {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = TranscoderConfig.load(config_path)
    tensors = load_file(str(weights_path), device=str(device or "cpu"))
    model = MatryoshkaTranscoder(cfg, device=device)
    check_state_matches(model, tensors, source=str(weights_path))
    model.load_state_dict(tensors)
    return model


def check_state_matches(model: MatryoshkaTranscoder, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise a `ValueError` naming every tensor whose presence, shape or dtype differs from `model`."""
    expected = model.state_dict()
    problems = [f"missing {name}" for name in expected if name not in tensors]
    problems += [f"unexpected {name}" for name in tensors if name not in expected]
    for name, t in tensors.items():
        if name in expected and (t.shape != expected[name].shape or t.dtype != expected[name].dtype):
            problems.append(f"{name}: file has {list(t.shape)} {t.dtype}, config expects "
                            f"{list(expected[name].shape)} {expected[name].dtype}")
    if problems:
        cfg = model.cfg
        raise ValueError(f"{source} does not match its config (d_in={cfg.d_in}, d_out={cfg.d_out}, "
                         f"d_sae={cfg.d_sae}, skip_connection={cfg.skip_connection}, dtype={cfg.dtype}): "
                         + "; ".join(problems) + ". Use the config.json saved with these weights.")

