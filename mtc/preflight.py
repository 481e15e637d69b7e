"""Checks of a training launch that need no language model, run by `python -m mtc train` before it loads
one (a model can take a minute to load; a typo should not): the device, a local model folder, the W&B
key, the dataset (its first document, for local files), and the checkpoints a run would resume from.
Each failure is a `UsageError` naming the field or file and the fix."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import checkpoint_problem, checkpoint_step, list_checkpoints
from .config import TranscoderConfig
from .errors import CheckpointError, UsageError
from .logger import check_wandb_key


def check_before_model(configs: list[TranscoderConfig], resume: str, mirror_dirs: list[Path | None]) -> None:
    first = configs[0]
    check_device(first.device)
    check_model_path(first.model_name)
    for cfg in configs:
        check_wandb_key(cfg.wandb_mode)
    check_dataset(first.dataset, first.dataset_split, first.text_column)
    check_resume(configs, resume, mirror_dirs)


def check_device(device: str) -> None:
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
    lines = str(err).strip().splitlines()
    return (f"dataset {dataset} cannot be read ({type(err).__name__}: {lines[0] if lines else ''}); a .jsonl "
            f"file needs one JSON object per line with a {column!r} field")


def _checkpoints(run_dir: Path, mirror_dir: Path | None) -> dict[int, Path]:
    found = {}
    if mirror_dir is not None:
        try:
            found.update({checkpoint_step(p): p for p in list_checkpoints(mirror_dir)})
        except OSError:
            pass
    found.update({checkpoint_step(p): p for p in list_checkpoints(run_dir)})
    return found


def check_resume(configs: list[TranscoderConfig], resume: str, mirror_dirs: list[Path | None]) -> None:
    """The checkpoint a run would resume from exists, looks whole and lies within the token budget."""
    from .train import check_budget

    if resume == "never":
        for cfg, mirror in zip(configs, mirror_dirs):
            found = _checkpoints(cfg.run_dir, mirror)
            if found:
                raise UsageError(f"--resume never: {cfg.run_dir} (or its mirror) already holds checkpoints of a run "
                                 f"(steps {sorted(found)}); starting afresh there would mix two runs. Choose a new "
                                 f"--run-name, or delete the old run's folder")
        return
    if resume != "auto":
        if len(configs) > 1:
            raise UsageError(f"--resume {resume}: a checkpoint path resumes a single transcoder; with several "
                             f"--config files use --resume auto")
        path = Path(resume)
        if not path.exists():
            raise UsageError(f"--resume {resume} does not exist; pass a checkpoints/step_<N> folder, 'auto' or "
                             f"'never'")
        if (path / "checkpoints").is_dir():
            raise UsageError(f"--resume {resume}: a run dir, not a checkpoint; pass one of its checkpoints/step_<N> "
                             f"folders, or --resume auto with --output-dir and --run-name naming the run")
        problem = checkpoint_problem(path)
        if problem:
            raise UsageError(f"--resume {resume}: {problem}; pass a complete checkpoints/step_<N> folder "
                             f"(or --resume auto for the newest that loads)")
        try:
            step = checkpoint_step(path)
        except AttributeError:
            raise UsageError(f"--resume {resume}: the folder is not named step_<N>; pass a checkpoints/step_<N> "
                             f"folder") from None
        for cfg in configs:
            check_budget(cfg, step, path)
        return
    for cfg, mirror in zip(configs, mirror_dirs):
        found = _checkpoints(cfg.run_dir, mirror)
        problems = []
        for step in sorted(found, reverse=True):
            problem = checkpoint_problem(found[step])
            if problem is None:
                check_budget(cfg, step, found[step])
                break
            problems.append(f"{found[step]}: {problem}")
        else:
            if problems:
                raise CheckpointError(cfg.run_dir / "checkpoints",
                                      f"no checkpoint loads ({'; '.join(problems)}). Restore one from a copy, "
                                      f"delete the damaged step folders to start afresh, or choose a new run_name")
