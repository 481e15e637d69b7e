"""Checks of a training launch that need no language model, run by `mtc.launch` before it loads one (a model can
take a minute to load; a typo should not): the device, a local model folder, the W&B key, and the dataset (its
first document, for local files). Each failure is a `UsageError` naming the field or file and the fix. Which
checkpoint a run resumes from is checked before the model too, by `mtc.resume.decide_resume`."""

from __future__ import annotations

from pathlib import Path

from .config import TranscoderConfig
from .errors import UsageError
from .logger import check_wandb_key


def check_before_model(configs: list[TranscoderConfig]) -> None:
    """The device, every config's W&B mode and the dataset of a launch's `configs` (which share device and
    data). The model folder is checked earlier, before its shape is read (`check_model_path`)."""
    first = configs[0]
    check_device(first.device)
    for cfg in configs:
        check_wandb_key(cfg.wandb_mode)
    check_dataset(first.dataset, first.dataset_split, first.text_column)


def check_device(device: str) -> None:
    """`device` names a device torch has here: auto, cpu, cuda (with a GPU) or mps."""
    import torch

    try:
        chosen = torch.device("cpu" if device == "auto" else device)
    except (RuntimeError, ValueError):
        raise UsageError(f"device: unknown device {device!r}; use auto, cpu or cuda") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device: {device} was asked for but torch sees no CUDA GPU; use --device auto (the GPU "
                         f"when there is one) or cpu (in Colab: Runtime > Change runtime type > GPU)")
    if chosen.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device: {device!r} is not supported; use auto, cpu or cuda")


def check_model_path(name: str) -> None:
    """A local model folder must exist and hold config.json (hub ids are checked when they load)."""
    from .language_model import OFFLINE_MODEL, resolve_model_path

    if name == OFFLINE_MODEL or not (name.startswith((".", "/", "~")) or Path(name).expanduser().exists()):
        return
    try:
        resolve_model_path(name)
    except FileNotFoundError as err:
        raise UsageError(f"model_name: {err}") from None


def check_dataset(dataset: str, split: str, column: str) -> None:
    """Open the dataset; for local files also read the first document (checks the text column)."""
    from .data import OFFLINE_CORPUS, load_documents

    if dataset == OFFLINE_CORPUS:
        return
    local = Path(dataset).expanduser().exists()
    try:
        documents = load_documents(dataset, split, column)
        if local:
            next(iter(documents))
    except StopIteration:
        raise UsageError(f"dataset {dataset} holds no text in column {column!r}; set text_column to the column "
                         f"holding the text, or point to another file") from None
    except KeyError as err:
        raise UsageError(str(err.args[0])) from None
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        if "dataset" in str(err):  # mtc's own messages name the dataset and the fix
            raise UsageError(str(err)) from None
        raise UsageError(unreadable(dataset, column, err)) from None
    except Exception as err:  # pyarrow / datasets parse errors come in many types
        raise UsageError(unreadable(dataset, column, err)) from None


def unreadable(dataset: str, column: str, err: Exception) -> str:
    """The message for a dataset that opened but could not be parsed."""
    lines = str(err).strip().splitlines()
    return (f"dataset {dataset} cannot be read ({type(err).__name__}: {lines[0] if lines else ''}); a .jsonl "
            f"file needs one JSON object per line with a {column!r} field")
