"""One training process per run dir.

`hold(run_dir)` takes an advisory lock (`fcntl.flock`) on `<run_dir>/.lock`. The operating system
releases it when the process ends, however it ends (SIGKILL included), so a crashed run never blocks
the next one; a second process asking for a held run dir is refused at once. `python -m mtc train` takes it
before loading the model (`mtc.launch`); holding is counted per process, so a caller may nest holds.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not protected from each other there
    fcntl = None

LOCK_FILE = ".lock"
_held: dict[str, list[int]] = {}  # resolved run dir -> [file descriptor, hold count]


class RunDirBusy(UsageError):
    """Another process is training in this run dir."""


def _open_lock_file(run_dir: Path) -> int:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UsageError(f"output_dir: cannot create or write the run dir {run_dir} ({err.strerror}); set "
                         f"--output-dir to a writable folder") from None


def acquire(run_dir: str | Path) -> None:
    """Lock `run_dir` for this process (creating it), or raise `RunDirBusy`."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        _held[key][1] += 1
        return
    fd = _open_lock_file(run_dir)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if not isinstance(err, BlockingIOError):  # a file system without locks (some network mounts)
                print(f"note: cannot lock the run dir {run_dir} ({err.strerror}); make sure no other run uses it",
                      file=sys.stderr)
                _held[key] = [fd, 1]
                return
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(f"run dir {run_dir} is in use by another training process (pid {holder}); two runs "
                             f"in one folder would mix their checkpoints and metrics. Wait for it to end (or stop "
                             f"it), or choose another --run-name or --output-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = [fd, 1]


def release(run_dir: str | Path) -> None:
    key = str(Path(run_dir).resolve())
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        os.close(entry[0])  # closing the descriptor drops the flock


@contextmanager
def hold(run_dirs):
    """Lock every run dir in `run_dirs` for the duration of the block."""
    taken = []
    try:
        for run_dir in run_dirs:
            acquire(run_dir)
            taken.append(run_dir)
        yield
    finally:
        for run_dir in reversed(taken):
            release(run_dir)
