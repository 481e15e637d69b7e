import os

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
