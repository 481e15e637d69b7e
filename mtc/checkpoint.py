"""Saving and loading transcoder weights: `model.safetensors` + `config.json` in one folder.

Files are written under a temporary name and renamed into place, so an interrupted save never
leaves a half-written file where a good one was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .clt import build_model
from .config import TranscoderConfig
from .errors import CheckpointError, disk_full_error
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
    model = build_model(cfg, device=device)
    check_state_matches(model, tensors, source=str(weights_path))
    model.load_state_dict(tensors)
    return model


def model_folder(path: str | Path) -> tuple[Path, Path]:
    """(folder holding model.safetensors + config.json, run dir to write reports into) for `--run`."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else (
            path.parent if path.name == "final" else path)
        return path, run_dir
    if (path / "final" / WEIGHTS_FILE).is_file():
        return path / "final", path
    checkpoints = list_checkpoints(path)
    if checkpoints:
        return checkpoints[-1], path
    raise FileNotFoundError(f"{path} holds no trained transcoder (no final/, no checkpoints/step_<N>, no "
                            f"model.safetensors); pass a run dir written by `python -m mtc train`")


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
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE, META_FILE)
TEMPORARY_PREFIXES = (".tmp-", ".trash-")  # interrupted writes and deletions

# Settings that may change when a run resumes: logging, paths, budget, and how the numbers are computed (a
# resumed run may land on another GPU; then it is no longer bit-identical, and the trainer says so). Derived
# from the config's field groups: see `SettingGroup` in mtc/config.py.
RESUMABLE_CHANGES = TranscoderConfig.resumable_fields()


def write_checkpoint(run_dir: Path, step: int, model: MatryoshkaTranscoder, trainer_state: dict,
                     meta: dict, scales: ActivationScales | None = None) -> Path:
    """Write checkpoint `step` of a run atomically; returns its folder. `model.safetensors` is in raw units
    (`scales` folded in); the trainer state keeps the training-unit weights a resumed run continues from."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp-step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save(model, tmp, scales)  # model.safetensors + config.json
        torch.save(trainer_state, tmp / STATE_FILE)
        atomic_write_bytes(tmp / META_FILE, json.dumps({"step": step, **meta}, indent=2).encode())
    except Exception as err:  # torch's zip writer and safetensors report a full disk as their own errors
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(run_dir)
        kept = f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint was written yet"
        needed = tensor_bytes(model.state_dict()) + tensor_bytes(trainer_state)
        full = disk_full_error(err, root, needed, f"checkpoint step_{step}", kept)
        if full is None:
            raise
        raise full from err
    if final.exists():
        remove_checkpoint(final)
    os.replace(tmp, final)
    return final


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a nested structure of dicts, lists and tuples."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (`step_<N>` folders with `meta.json`, written last), oldest first.
    Listed is not loadable: a half-synced copy may lack a file; `load_checkpoint` says which."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / META_FILE).is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def run_checkpoints(run_dir: Path, mirror_dir: Path | None = None) -> dict[int, Path]:
    """Every complete checkpoint of a run by step: its own and its mirror's. A step held in both is the local
    copy (no download); an unreachable mirror (Drive unmounted) holds none."""
    found = {}
    if mirror_dir is not None:
        try:
            found.update({checkpoint_step(p): p for p in list_checkpoints(mirror_dir)})
        except OSError:
            pass
    found.update({checkpoint_step(p): p for p in list_checkpoints(run_dir)})
    return found


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and leftovers of interrupted writes."""
    for old in list_checkpoints(run_dir)[:-keep]:
        remove_checkpoint(old)
    clean_temporaries(run_dir)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint (or other) folder so that no interruption leaves a partial one under its `step_<N>` name:
    it is renamed to `.trash-step_<N>` first, then deleted."""
    path = Path(path)
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_temporaries(run_dir: Path) -> None:
    """Remove what interrupted writes and deletions left in a run dir or mirror (`.tmp-*`, `.trash-*`, in
    the folder and in `checkpoints/`). Only for a folder no other process is writing: see `mtc.lock`."""
    for folder in (Path(run_dir), Path(run_dir) / CHECKPOINTS):
        if not folder.is_dir():
            continue
        for leftover in folder.iterdir():
            if leftover.name.startswith(TEMPORARY_PREFIXES):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)


def load_checkpoint(path: Path, device: torch.device | str | None = None) -> tuple[MatryoshkaTranscoder, dict, dict]:
    """(model, trainer_state, meta) of a checkpoint folder. Raises `CheckpointError` naming the file when
    one is missing or unreadable (truncated, zero-filled, half-synced)."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(path, problem)
    try:
        model = load(path, device=device)
    except Exception as err:  # safetensors, JSON and size errors all mean the same: this file is damaged
        raise CheckpointError(path, f"{WEIGHTS_FILE} or {CONFIG_FILE} cannot be loaded ({_brief(err)})") from err
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as err:  # zip, pickle and EOF errors
        raise CheckpointError(path, f"{STATE_FILE} cannot be loaded ({_brief(err)})") from err
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(path, f"{STATE_FILE} lacks {missing}")
    meta = json.loads((path / META_FILE).read_text())
    return model, state, meta


STATE_KEYS = ("step", "optimizer", "tokens_since_fired", "store", "torch_rng")


def _brief(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def checkpoint_problem(path: Path) -> str | None:
    """Why folder `path` is not a usable checkpoint, found by reading headers only (no tensors): a
    missing, empty, truncated or zero-filled file. None when it looks whole."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is a file, not a checkpoint folder"
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            return f"{name} is missing (an interrupted write or a half-synced copy)"
        if (path / name).stat().st_size == 0:
            return f"{name} is empty"
    for name in (META_FILE, CONFIG_FILE):
        try:
            json.loads((path / name).read_text())
        except (ValueError, OSError) as err:
            return f"{name} is unreadable ({_brief(err)})"
    try:
        from safetensors import safe_open

        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as weights:
            weights.keys()
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        return f"{WEIGHTS_FILE} is damaged ({_brief(err)})"
    try:
        size = (path / STATE_FILE).stat().st_size
        with zipfile.ZipFile(path / STATE_FILE) as archive:  # torch.save writes a zip archive
            if any(info.header_offset + info.compress_size > size for info in archive.infolist()):
                return f"{STATE_FILE} is truncated"
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        return f"{STATE_FILE} is damaged ({_brief(err)})"
    return None


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
    try:
        if Path(source).is_dir():
            shutil.copytree(source, tmp)
            if target.exists():
                remove_checkpoint(target)
        else:
            shutil.copy2(source, tmp)
    except OSError:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
