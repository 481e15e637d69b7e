"""Facts about the environment a run is launched in: Google Colab, Google Drive and the GPU.

Only the standard library is imported at module level: `colab_train.py` imports this module before
the requirements may be installed. torch is imported inside `gpu_settings`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DRIVE_ROOT = Path("/content/drive/MyDrive")

DRIVE_MOUNT_HELP = """\
Google Drive is not mounted, so checkpoints are saved on this Colab machine only and are lost when
the runtime is recycled. A script started with `!python` cannot mount Drive itself. To keep copies
on Drive, run this in a notebook cell:

    from google.colab import drive; drive.mount('/content/drive')

then re-run the training command: it resumes from the newest checkpoint (--resume auto)."""


def in_colab() -> bool:
    """Whether this process runs on a Colab machine. Read from environment variables, because a
    `!python` subprocess cannot import `google.colab`."""
    return bool(os.environ.get("COLAB_RELEASE_TAG") or os.environ.get("COLAB_GPU"))


def drive_mounted(root: Path = DRIVE_ROOT) -> bool:
    """Whether Google Drive is mounted (its MyDrive folder exists only while it is)."""
    return Path(root).is_dir()


def default_mirror_dir(run_name: str, root: Path = DRIVE_ROOT) -> Path | None:
    """`<Drive>/mtc/<run_name>` when running in Colab with Drive mounted, else None."""
    if in_colab() and drive_mounted(root):
        return Path(root) / "mtc" / run_name
    return None


def resolve_mirror_dir(drive_dir: str, run_name: str) -> Path | None:
    """The checkpoint mirror of a run from the config field `drive_dir`: "auto" mirrors to Drive in
    Colab (see `default_mirror_dir`), "none" or "" disables mirroring, and any other value is a
    mirror root that gets the run's own folder."""
    choice = drive_dir.strip()
    if choice.lower() == "auto":
        return default_mirror_dir(run_name, DRIVE_ROOT)
    if choice.lower() in ("", "none"):
        return None
    return Path(choice).expanduser() / run_name


# ---------------------------------------------------------------------- GPU and dtypes
NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere and newer (A100, L4, H100) compute in bfloat16 natively
@dataclass
class GpuSettings:
    """Device and dtypes chosen for the machine; `note` says why in one line."""

    device: str  # "cuda" or "cpu"
    name: str  # GPU name, or "cpu"
    compute_capability: tuple[int, int] | None
    memory_gb: float | None
    model_dtype: str  # language-model forward pass
    activation_dtype: str  # activations kept in the shuffling buffer
    native_bf16: bool
    note: str
    compute_dtype: str = "float32"  # the transcoder's encoder matmul (parameters stay float32)


def settings_for(name: str | None, capability: tuple[int, int] | None,
                 memory_gb: float | None) -> GpuSettings:
    """Choose dtypes for a GPU described by its name, compute capability and memory (`name=None`
    means no GPU). Pure, so every GPU can be covered by tests on a CPU machine."""
    if name is None:
        return GpuSettings("cpu", "cpu", None, None, "float32", "float32", False,
                           "no GPU: everything runs on the CPU in float32")
    if capability is None:
        return GpuSettings("cuda", name, None, memory_gb, "float32", "float32", False,
                           f"{name}: compute capability unknown, so float32 throughout to be safe")
    capability = (int(capability[0]), int(capability[1]))
    cc = f"{capability[0]}.{capability[1]}"
    if capability >= NATIVE_BF16_CAPABILITY:
        return GpuSettings("cuda", name, capability, memory_gb, "bfloat16", "bfloat16", True,
                           f"{name} (compute {cc}) has native bfloat16: model, activation store and the "
                           f"transcoder's encoder matmul in bfloat16 (its parameters and Adam state in float32)",
                           compute_dtype="bfloat16")
    # T4 (7.5) and older: bfloat16 is emulated and slow, so the model runs in float16. Gemma's
    # activations can exceed float16's range, hence the check-and-fallback done by the store.
    # Activations are stored in float16 too: they come out of a float16 model, and float32 would double
    # a buffer that must share 16 GB with the model.
    return GpuSettings("cuda", name, capability, memory_gb, "float16", "float16", False,
                       f"{name} (compute {cc}) has no native bfloat16 (emulated bf16 is slow): model and "
                       f"activation buffer in float16; the activation store checks that activations are "
                       f"finite and falls back to float32 if float16 overflows")


def gpu_settings() -> GpuSettings:
    """`settings_for` the first visible CUDA GPU, or the CPU settings when there is none."""
    import torch

    if not torch.cuda.is_available():
        return settings_for(None, None, None)
    props = torch.cuda.get_device_properties(0)
    return settings_for(props.name, (props.major, props.minor), round(props.total_memory / 2**30, 1))


# ---------------------------------------------------------------------- installation
def install_requirements(repo_root: Path, quiet: bool = True) -> None:
    """`pip install -r requirements.txt`, then the checkout itself in editable mode without its
    dependencies. Raises `RuntimeError` with the tail of pip's output when pip fails."""
    repo_root = Path(repo_root)
    flags = ["-q"] if quiet else []
    commands = [
        [sys.executable, "-m", "pip", "install", *flags, "-r", "requirements.txt"],
        [sys.executable, "-m", "pip", "install", *flags, "--no-deps", "-e", "."],
    ]
    for command in commands:
        # Quiet runs capture pip's output to show it only on failure; loud runs stream it.
        result = subprocess.run(command, cwd=repo_root, capture_output=quiet, text=True)
        if result.returncode != 0:
            tail = ((result.stdout or "") + (result.stderr or ""))[-3000:].strip() or "(see pip's output above)"
            raise RuntimeError(f"`{' '.join(command[1:])}` failed in {repo_root} "
                               f"(exit {result.returncode}):\n{tail}")
