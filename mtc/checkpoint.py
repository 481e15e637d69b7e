"""Saving and loading transcoder weights: `model.safetensors` + `config.json` in one folder.

Files are written under a temporary name and renamed into place, so an interrupted save never
leaves a half-written file where a good one was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import TranscoderConfig
from .scaling import ActivationScales
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


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """`safetensors` file written under a temporary name, then renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save(model: MatryoshkaTranscoder, path: str | Path, scales: ActivationScales | None = None) -> Path:
    """Write `model.safetensors` (parameters and threshold) and `config.json` into folder `path`.

    `scales`: the activation scales `model` was trained under; they are folded into the written weights,
    so the file always maps raw source activations to raw target activations."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    if scales is not None:
        tensors = scales.fold(tensors)
    atomic_save_tensors(tensors, path / WEIGHTS_FILE, metadata={"format": "mtc"})
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



# ---------------------------------------------------------------------- run checkpoints
# <run_dir>/checkpoints/step_<N>/{model.safetensors, trainer_state.pt, meta.json}. A step folder is
# written under a hidden temporary name and renamed when complete, so every `step_<N>` is whole.
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")

# Settings that may change when a run resumes: logging, paths, budget, and the dtypes (a resumed run
# may land on another GPU; then it is no longer bit-identical, and the trainer says so).
RESUMABLE_CHANGES = {"total_tokens", "output_dir", "drive_dir", "log_every", "checkpoint_every",
                     "keep_checkpoints", "wandb_mode", "wandb_project", "wandb_entity",
                     "wandb_log_checkpoints", "device", "run_name", "samples_every", "samples_top_n",
                     "model_dtype", "activation_dtype", "compute_dtype",  # a resumed run may land on another GPU
                     "kernels", "prefetch", "calibration_tokens"}  # same maths and data, computed differently


def write_checkpoint(run_dir: Path, step: int, model: MatryoshkaTranscoder, trainer_state: dict,
                     meta: dict, scales: ActivationScales | None = None) -> Path:
    """Write checkpoint `step` of a run atomically; returns its folder. `model.safetensors` is in raw units
    (`scales` folded in); the trainer state keeps the training-unit weights a resumed run continues from."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp-step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save(model, tmp, scales)  # model.safetensors + config.json
    torch.save(trainer_state, tmp / STATE_FILE)
    atomic_write_bytes(tmp / META_FILE, json.dumps({"step": step, **meta}, indent=2).encode())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / META_FILE).is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and leftovers of interrupted writes."""
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    root = Path(run_dir) / CHECKPOINTS
    for leftover in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(path: Path, device: torch.device | str | None = None) -> tuple[MatryoshkaTranscoder, dict, dict]:
    """(model, trainer_state, meta) of a checkpoint folder."""
    path = Path(path)
    model = load(path, device=device)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    meta = json.loads((path / META_FILE).read_text())
    return model, state, meta


def config_differences(saved: TranscoderConfig, current: TranscoderConfig) -> list[str]:
    """Fields whose change would make a resumed run differ from the original."""
    a, b = saved.to_dict(), current.to_dict()
    return [f"{name}: checkpoint has {a[name]!r}, now {b[name]!r}" for name in a
            if name not in RESUMABLE_CHANGES and a[name] != b.get(name)]


def copy_to_mirror(source: Path, mirror_root: Path, relative: str) -> None:
    """Copy file or folder `source` to `mirror_root/relative`: into a temporary name first, then renamed,
    so the mirror never holds a partial copy under the final name. Raises OSError on failure."""
    target = Path(mirror_root) / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    if Path(source).is_dir():
        shutil.copytree(source, tmp)
        if target.exists():
            shutil.rmtree(target)
    else:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)
