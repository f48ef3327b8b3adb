"""Atomic writes: each file of a run directory is written to a temporary name, fsynced, then renamed over its target
(os.replace is atomic on POSIX), so a process killed mid-write leaves the previous version whole."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMPORARY = ".*.tmp-*"
"""Glob of the temporaries atomic_write makes: a killed write leaves one behind, for the next writer to sweep."""


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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
