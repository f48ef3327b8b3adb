"""The run folder's temporaries and lock.

Each file of a run directory is written whole (fasttrain._files.atomic_write: a temporary of its writer's own, then
a rename); the next writer sweeps the temporaries of writers that are gone. A run folder has one writer at a time:
RunLock holds an exclusive flock(2) on RUN/.lock, which the OS releases when the process ends however it ends.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

from fasttrain._files import TEMPORARY, TEMPORARY_PID

LOCK_FILE = ".lock"


def sweep_temporaries(folder: Path) -> None:
    """Remove the temporaries in folder left by writers that are no longer running (a killed save or metrics write);
    a live process's are its own business."""
    for tmp in Path(folder).glob(TEMPORARY):
        match = TEMPORARY_PID.match(tmp.name)
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
