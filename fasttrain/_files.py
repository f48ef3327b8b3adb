"""Atomic writes: what fasttrain saves is whole or absent, never half-written.

Each file is written to a temporary name of its writer's own beside it (pid and thread in the name), fsynced, then
renamed over its target (os.replace is atomic on POSIX), so a process killed mid-write leaves the previous version
whole. fasttrain.train.files sweeps the temporaries of writers that are gone.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMPORARY = ".*.tmp-*"
"""Glob of the temporaries atomic_write makes: a killed write leaves one behind, for the next writer to sweep."""
TEMPORARY_PID = re.compile(r"^\..+\.tmp-(\d+)(?:-\d+)?$")
"""A temporary's name, its writer's pid in group 1."""


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """write(f) into a temporary file beside path, then rename it over path; the temporary is removed on failure."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_native_id()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a power loss, not only a kill
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:  # a write's own: no path in it
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
