"""Atomic writes and the run folder's lock.

Each file of a run directory is written to a temporary name of its writer's own (the pid in it), fsynced, then
renamed over its target (os.replace is atomic on POSIX), so a process killed mid-write leaves the previous version
whole; the next writer sweeps the temporaries of writers that are gone. A run folder has one writer at a time:
RunLock holds an exclusive flock(2) on RUN/.lock, which the OS releases when the process ends however it ends.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMPORARY = ".*.tmp-*"
"""Glob of the temporaries atomic_write makes: a killed write leaves one behind, for the next writer to sweep."""
_TEMPORARY_PID = re.compile(r"^\..+\.tmp-(\d+)$")
LOCK_FILE = ".lock"


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """write(f) into a temporary file beside path, then rename it over path; the temporary is removed on failure."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a power loss, not only a kill
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:  # a write's own: no path in it
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep_temporaries(folder: Path) -> None:
    """Remove the temporaries in folder left by writers that are no longer running (a killed save or metrics write);
    a live process's are its own business."""
    for tmp in Path(folder).glob(TEMPORARY):
        match = _TEMPORARY_PID.match(tmp.name)
        if match and not _alive(int(match.group(1))):
            if tmp.is_dir():  # a sharded checkpoint's folder (fasttrain.train.sharded)
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """An exclusive advisory lock on a run folder (flock on RUN/.lock, which holds the owner's pid); `release()` or
    the process's end frees it. ValueError naming the holder's pid when another process (or another RunLock of this
    one) has it."""

    def __init__(self, run_dir: Path, what: str = "train.out_dir"):
        self.file = open(Path(run_dir) / LOCK_FILE, "a+b", buffering=0)  # noqa: SIM115 (held until release)
        fd = self.file.fileno()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            self.file.close()
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise ValueError(
                f"{what} {str(run_dir)!r} is in use by another fasttrain run (pid {holder}); wait for it to end, "
                f"or pick another {what}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # opened for appending: lands at 0, after the truncation

    def release(self) -> None:
        self.file.close()  # closing the last descriptor of the open file drops its flock
