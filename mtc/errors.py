"""How failures reach the user of `python -m mtc`: one line naming the field or file and the fix.

Bad input (a setting, a file, a folder) exits with code 2 and no traceback; a full disk exits with
code 1. `MTC_DEBUG=1` (or `train --debug`) shows the traceback instead, for bug reports.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

DEBUG_VARIABLE = "MTC_DEBUG"


class UsageError(ValueError):
    """Bad input found before any expensive work: the message names the field or file and the fix."""


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used; the message names the folder, the file and why."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"checkpoint {path}: {problem}")
        self.path, self.problem = Path(path), problem


class DiskFullError(OSError):
    """A write failed for lack of space; the message names the folder and the space needed."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def debug_requested() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when torch's zip writer reports it as a RuntimeError."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "no space left on device" in str(err).lower()


def free_bytes(folder: Path) -> int | None:
    """Free space on the disk holding `folder` (or its nearest existing parent); None if unknown."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def size(n: int) -> str:
    """`n` bytes for people: 12.3 GB, 456.7 MB, 89.0 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1e3:,.1f} kB"


def disk_full_error(err: BaseException, folder: Path, needed: int, what: str, kept: str) -> DiskFullError | None:
    """A `DiskFullError` for a failed write of `needed` bytes into `folder` when the disk is full (the
    error says so, or less than `needed` is free); None when the failure is something else."""
    free = free_bytes(folder)
    if not is_disk_full(err) and (free is None or free >= needed):
        return None
    space = f"needs about {size(needed)}, {size(free)} free" if free is not None else f"needs about {size(needed)}"
    return DiskFullError(f"disk full: could not write {what} to {folder} ({space}). Free some space or set "
                         f"--output-dir to a bigger disk; {kept}, and the same command resumes from it")


_OS_FIXES = {
    errno.ENOSPC: "the disk is full; free some space or use another disk",
    errno.EACCES: "no permission to write there; choose a writable folder",
    errno.EPERM: "the system does not allow writing there; choose a writable folder",
    errno.EROFS: "that file system is read-only; choose a writable folder",
    errno.ENOTDIR: "part of the path is a file, not a folder; fix the path",
    errno.EEXIST: "a file is in the way of a folder; fix the path",
    errno.ENOENT: "check the path",
}


def describe(err: BaseException) -> str:
    """One line for the user."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])  # str(KeyError) would add quotes
    if is_disk_full(err) and not isinstance(err, DiskFullError):
        return (f"disk full ({' '.join(str(err).split())}); free some space or set --output-dir to a bigger disk, "
                f"then run the same command: --resume auto continues from the last good checkpoint")
    if isinstance(err, (DiskFullError, CheckpointError)) or not isinstance(err, OSError):
        return str(err)
    if err.filename is None or str(err.filename) in str(err.strerror):
        return str(err)
    fix = _OS_FIXES.get(err.errno, "check the path")
    return f"{err.filename}: {err.strerror}; {fix}"


REPORTED = (ValueError, OSError, RuntimeError, ImportError, KeyError)  # reported in one line; others are bugs


def reported(err: BaseException) -> bool:
    """Whether `err` is reported as one line (bad input, a full disk) rather than with a traceback."""
    return isinstance(err, REPORTED) or is_disk_full(err)


def exit_code(err: BaseException) -> int:
    """2 for bad input, 1 when the run failed for another reason (disk full)."""
    return 1 if is_disk_full(err) else 2
