"""The mirror of a run dir (Google Drive in Colab): background copies that never stop training.

Checkpoints are written locally first, then copied here on a background thread, one copy at a time,
under a temporary name and renamed (`checkpoint.copy_to_mirror`). A missing, full or failing mirror only
warns: local checkpoints are kept. On a fresh machine the mirror's checkpoints and history let a run
resume.
"""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from .checkpoint import checkpoint_step, clean_temporaries, copy_to_mirror, list_checkpoints, prune_checkpoints
from .errors import is_disk_full
from .logger import METRICS_FILE


class Mirror:
    """The mirror of one run dir; `root=None` mirrors nothing and every method does nothing."""

    def __init__(self, root: Path | None, run_dir: Path, keep_checkpoints: int, pool: ThreadPoolExecutor):
        self.root, self.run_dir, self.keep_checkpoints, self.pool = root, run_dir, keep_checkpoints, pool
        self.job: Future | None = None

    def holds(self, path: Path) -> bool:
        return self.root is not None and self.root in Path(path).parents

    def checkpoints(self) -> dict[int, Path]:
        """The mirror's complete checkpoints by step; none when it is unreachable (local ones still count)."""
        if self.root is None:
            return {}
        try:
            return {checkpoint_step(p): p for p in list_checkpoints(self.root)}
        except OSError:
            return {}

    def fetch_history(self) -> None:
        """Resuming from the mirror on a fresh machine: bring back the run's metrics and config first, so
        the next copy does not replace the mirror's history with a shorter one."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, "config.json"):
            source = self.root / name
            if source.is_file() and not (self.run_dir / name).exists():
                lines = source.read_text().splitlines(keepends=True)
                if name == METRICS_FILE and lines and not lines[-1].endswith("\n"):
                    lines = lines[:-1]  # a copy torn by an interrupted append
                (self.run_dir / name).write_text("".join(lines))

    def clean(self) -> None:
        """Leftovers of interrupted copies (safe while this process holds the run dir)."""
        if self.root is None:
            return
        try:
            clean_temporaries(self.root)
        except OSError:
            pass  # an unreachable mirror only warns, when it is first written

    def copy(self, items: list[tuple[Path, str]], prune: bool) -> None:
        """Copy `(source, path relative to the mirror)` items in the background, after the previous copy."""
        if self.root is None:
            return
        self.wait()

        def copy() -> None:
            for source, relative in items:
                if source.exists():
                    copy_to_mirror(source, self.root, relative)
            if prune:
                prune_checkpoints(self.root, self.keep_checkpoints)

        self.job = self.pool.submit(copy)

    def wait(self) -> None:
        """Wait for the copy in progress; a failure is a warning."""
        if self.job is None:
            return
        try:
            self.job.result()
        except OSError as err:
            full = "its disk is full: " if is_disk_full(err) else ""
            tqdm.write(f"warning: could not copy to the mirror {self.root} ({full}{err}); training goes on and "
                       f"local checkpoints in {self.run_dir} are kept", file=sys.stderr)
        self.job = None
