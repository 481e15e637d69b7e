"""Resuming: the one place the `--resume never | auto | <step_N folder>` policy is decided, and what a checkpoint
holds besides the weights (`trainer_state`) and how a run is restored from it (`restore_newest`).

`decide_resume` runs before the language model loads. It lists each run's checkpoints (local and mirror,
`checkpoint.run_checkpoints`), reads only their headers, and returns the checkpoints to continue from, newest
first, or None to start afresh; the `Trainer` restores the first that loads. A refusal is a `UsageError` (or a
`CheckpointError` when no checkpoint of a run loads) naming the folder and the fix.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import checkpoint_problem, checkpoint_step, config_differences, load_checkpoint, run_checkpoints
from .config import TranscoderConfig
from .errors import CheckpointError, UsageError
from .scaling import scales_for


@dataclass
class ResumePoint:
    """Checkpoints to continue from, newest first: each candidate is one `step_<N>` folder per transcoder
    (the same step for all). Every candidate looked whole from its headers; the trainer restores the first
    that loads and falls back to the next with a warning."""

    candidates: list[list[Path]]

    @property
    def step(self) -> int:
        return checkpoint_step(self.candidates[0][0])


def check_budget(cfg: TranscoderConfig, step: int, checkpoint: Path) -> None:
    """Refuse a token budget that ends before a checkpoint already reached: the run cannot be shortened
    (its final weights would be the longer run's under a shorter run's config). Extending is allowed."""
    if step > cfg.total_steps:
        raise ValueError(f"total_tokens: {cfg.total_tokens:,} tokens make {cfg.total_steps} steps, but checkpoint "
                         f"{checkpoint} is at step {step}; a run cannot be shortened below its checkpoint. Set "
                         f"--total-tokens to at least {step * cfg.batch_size:,} (extending is allowed), or choose "
                         f"a new --run-name to start another run")


def skipping(err: CheckpointError) -> None:
    """Say that a damaged checkpoint is passed over for the one before it."""
    print(f"warning: skipping {err}; trying the previous checkpoint", file=sys.stderr)


def decide_resume(configs: list[TranscoderConfig], resume: str,
                  mirror_dirs: list[Path | None] | None = None) -> ResumePoint | None:
    """The checkpoints `configs` continue from under policy `resume` (None: start afresh)."""
    mirror_dirs = mirror_dirs or [None] * len(configs)
    if resume == "never":
        for cfg, mirror in zip(configs, mirror_dirs):
            found = run_checkpoints(cfg.run_dir, mirror)
            if found:
                raise UsageError(f"--resume never: {cfg.run_dir} (or its mirror) already holds checkpoints of a run "
                                 f"(steps {sorted(found)}); starting afresh there would mix two runs. Choose a new "
                                 f"run_name (--run-name), or delete the old run's folder")
        return None
    if resume != "auto":
        return ResumePoint([[_checked_path(configs, resume)]])
    available = [run_checkpoints(cfg.run_dir, mirror) for cfg, mirror in zip(configs, mirror_dirs)]
    if not any(available):
        return None
    common = set.intersection(*(set(found) for found in available))
    if not common:
        raise UsageError("--resume auto: the transcoders' run dirs hold checkpoints of different steps "
                         f"({[sorted(found) for found in available]}); resume them separately or use --resume never")
    candidates, skipped = [], []
    for step in sorted(common, reverse=True):
        paths = [found[step] for found in available]
        problems = [CheckpointError(path, problem) for path in paths if (problem := checkpoint_problem(path))]
        if problems:
            skipped.append(str(problems[0]))
            skipping(problems[0])
            continue
        if not candidates:
            for cfg, path in zip(configs, paths):
                check_budget(cfg, step, path)
        candidates.append(paths)
    if not candidates:
        raise CheckpointError(configs[0].run_dir / "checkpoints",
                              f"no checkpoint loads ({'; '.join(skipped)}). Restore one from a copy, delete the "
                              f"damaged step folders to start afresh, or choose a new run_name")
    return ResumePoint(candidates)


def _checked_path(configs: list[TranscoderConfig], resume: str) -> Path:
    """`--resume <step_N folder>`: it exists, is a whole checkpoint and lies within the token budget."""
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
    check_budget(configs[0], step, path)
    return path


# ---------------------------------------------------------------------- what a checkpoint restores
# `runs` are the `mtc.train.Run`s of a Trainer: each a transcoder with its optimiser, scales, samples and files.
def trainer_state(run, step: int, store, world_size: int) -> dict:
    """Everything besides the weights that an exact resume of `run` at `step` needs."""
    return {"step": step, "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
            "optimizer": run.optimizer.state_dict(),
            "tokens_since_fired": run.model.tokens_since_fired.cpu(),
            "samples": run.samples.state_dict() if run.samples is not None else None,
            "interval": {k: v.cpu() if torch.is_tensor(v) else v for k, v in run.interval.items()},
            "store": store.state_dict(), "torch_rng": torch.get_rng_state(),
            "world_size": world_size,
            "scales": run.scales.to_dict()}


def restore_newest(runs: list, store, resume: ResumePoint, device: torch.device, world_size: int) -> int:
    """Restore `runs` and `store` from the first candidate of `resume` that loads (a damaged one is skipped with a
    warning); returns the step they continue from."""
    skipped = []
    for paths in resume.candidates:
        try:
            return restore(runs, store, paths, device, world_size)
        except CheckpointError as err:
            skipped.append(str(err))
            skipping(err)
    raise CheckpointError(runs[0].run_dir / "checkpoints",
                          f"no checkpoint loads ({'; '.join(skipped)}). Restore one from a copy, delete the "
                          f"damaged step folders to start afresh, or choose a new run_name")


def read_checkpoint(cfg: TranscoderConfig, path: Path, device: torch.device):
    """(model, trainer state, meta) of checkpoint `path` for a run of `cfg`: `CheckpointError` when a file is
    damaged (the caller may fall back to an older one), `ValueError` when it belongs to another run or lies
    beyond the token budget."""
    saved, state, meta = load_checkpoint(path, device=device)
    differences = config_differences(saved.cfg, cfg)
    if differences:
        raise ValueError(f"checkpoint {path} belongs to a different run: " + "; ".join(differences)
                         + ". Use the run's own config, or a new run_name to start another run.")
    check_budget(cfg, state["step"], path)
    return saved, state, meta


def restore(runs: list, store, paths: list[Path], device: torch.device, world_size: int) -> int:
    """Restore every run from its checkpoint in `paths` (all read and checked before any changes), then the RNG
    and the store's position; returns the step."""
    loaded = [read_checkpoint(run.cfg, path, device) for run, path in zip(runs, paths)]
    for run, path, (saved, state, meta) in zip(runs, paths, loaded):
        for name in ("model_dtype", "activation_dtype", "compute_dtype", "kernels"):
            if getattr(saved.cfg, name) != getattr(run.cfg, name):
                print(f"note: {name} changed from {getattr(saved.cfg, name)} to {getattr(run.cfg, name)} "
                      "(another GPU?); the run continues but is no longer bit-identical to an "
                      "uninterrupted one", file=sys.stderr)
        if state.get("world_size", 1) != world_size:
            print(f"note: {path} was written by {state.get('world_size', 1)} process(es), this run has "
                  f"{world_size}; it continues with the same batches, but sums over the batch are "
                  "taken in another order, so it is not bit-identical to an uninterrupted run", file=sys.stderr)
        # model.safetensors is in raw units; training continues from the training-unit weights
        run.model.load_state_dict(state.get("model", saved.state_dict()))
        run.scales = scales_for(run.cfg).from_dict(state.get("scales"))
        run.model.tokens_since_fired.copy_(state["tokens_since_fired"])
        run.optimizer.load_state_dict(state["optimizer"])
        if run.samples is not None and state.get("samples") is not None:
            try:
                run.samples.load_state_dict(state["samples"])
            except (ValueError, RuntimeError) as err:  # other samples_top_n, or another device
                print(f"note: activation samples restart from this step ({err})", file=sys.stderr)
        run.interval = {k: v.to(device) if torch.is_tensor(v) else v for k, v in state.get("interval", {}).items()}
        run.last_metrics = meta.get("metrics", {})
        step = state["step"]
        run.files.resumed_from(path, step)
    torch.set_rng_state(state["torch_rng"])
    store.load_state_dict(state["store"])
    print(f"resumed from step {step} ({paths[0]})", file=sys.stderr)
    return step
