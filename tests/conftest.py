import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Folders holding tiny random models, built offline once per session."""
    from mtc.testing import tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {arch: tiny_model(root / arch, arch) for arch in ("gemma2", "gpt2")}


@pytest.fixture(scope="session")
def gemma2_bridge(tiny_dirs):
    from mtc.language_model import load_language_model

    return load_language_model(str(tiny_dirs["gemma2"]))


# ---------------------------------------------------------------------- `python -m mtc train` in-process
def train_args(model_dir, out, *extra, steps=20):
    """Arguments of `mtc.cli.main` for a quick run on a tiny model (10-step checkpoints, no W&B/mirror);
    later flags in `extra` override earlier ones."""
    return ["train", "--model-name", str(model_dir), "--layer", "1", "--d-sae", "64", "--k", "4",
            "--batch-size", "32", "--total-tokens", str(32 * steps), "--warmup-steps", "2", "--seq-len", "16",
            "--buffer-tokens", "256", "--model-batch-size", "8", "--checkpoint-every", "10", "--log-every", "10",
            "--drive-dir", "none", "--output-dir", str(out), "--run-name", "r", "--dataset", "pydoc",
            "--no-progress", "--wandb-mode", "disabled", "--samples-every", "0", *extra]


@pytest.fixture(scope="session")
def trained_run(tiny_dirs, tmp_path_factory):
    """A finished 30-step run (checkpoints step_20 and step_30) to copy and damage."""
    from mtc.cli import main

    out = tmp_path_factory.mktemp("trained")
    assert main(train_args(tiny_dirs["gemma2"], out, steps=30)) == 0
    return out / "r"


@pytest.fixture
def model_loads(monkeypatch):
    """Records every language-model load, to tell checks made before the model loads from those after."""
    import mtc.language_model

    calls = []
    real = mtc.language_model.load_language_model

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(mtc.language_model, "load_language_model", counting)
    return calls


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    """No W&B key anywhere: no WANDB_* variables and a HOME without ~/.netrc."""
    for name in [n for n in os.environ if n.startswith("WANDB") or n == "NETRC"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def killed_once_written(command: list[str], written: Path, env: dict, cwd: Path, wait_s: float = 240) -> None:
    """Start `command`, SIGKILL it as soon as `written` exists (a checkpoint folder, say), and check that it died
    by the kill and before it could finish."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    deadline = time.time() + wait_s
    while not written.exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
