"""Checkpoints: one file per step under RUN/checkpoints/, plus `latest` and `best` pointer files.

Every file is written atomically (fasttrain.train.files), so a run killed mid-save leaves the previous checkpoint and
pointers intact; the partial temporary is swept up by the next save. A checkpoint is data only (tensors, numbers,
strings): what it holds is the trainer's business (fasttrain.train.run), not this module's.
"""

from __future__ import annotations

import pickle
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from fasttrain.train.files import TEMPORARY, atomic_write, atomic_write_text

_NAME = re.compile(r"^step_(\d{8})\.pt$")
POINTERS = ("latest", "best")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: str | Path, step: int, state: dict, keep_last: int, is_best: bool = False) -> Path:
    """Write state as step_<step>.pt, point `latest` (and `best` if is_best) at it, keep the last keep_last + best."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(TEMPORARY):  # left by a save that was killed
        stale.unlink(missing_ok=True)
    path = folder / f"step_{step:08d}.pt"
    atomic_write(path, lambda f: torch.save(state, f))
    atomic_write_text(folder / "latest", path.name)
    if is_best:
        atomic_write_text(folder / "best", path.name)
    _prune(folder, keep_last)
    return path


def _prune(folder: Path, keep_last: int) -> None:
    steps = sorted(p for p in folder.iterdir() if _NAME.match(p.name))
    keep = {p.name for p in steps[-keep_last:]}
    keep.update((folder / name).read_text().strip() for name in POINTERS if (folder / name).is_file())
    for p in steps:
        if p.name not in keep:
            p.unlink()


def resolve(path: str | Path, which: str = "latest") -> Path:
    """A checkpoint file: `path` itself if it is a file, else the one the run directory's `which` pointer names."""
    path = Path(path)
    if path.is_file():
        return path
    if which not in POINTERS:
        raise ValueError(f"which must be one of {POINTERS}, got {which!r}")
    pointer = checkpoint_dir(path) / which
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    if not pointer.is_file():
        raise ValueError(f"no {which} checkpoint in run directory {str(path)!r} (missing {pointer})")
    file = pointer.parent / pointer.read_text().strip()
    if not file.is_file():
        raise ValueError(f"checkpoint {str(file)!r}, named by {str(pointer)!r}, does not exist")
    return file


def load(path: str | Path, which: str = "latest", map_location: str | torch.device = "cpu") -> dict:
    """The state dict saved by `save`, from a checkpoint file or a run directory's `which` pointer."""
    file = resolve(path, which)
    if not _is_torch_archive(file):
        raise ValueError(f"{str(file)!r} is not a fasttrain checkpoint (not an archive written by torch.save)")
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings), never code to unpickle.
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{str(file)!r} is not a fasttrain checkpoint (it holds objects other than tensors, numbers and strings)"
        ) from None


def _is_torch_archive(file: Path) -> bool:
    """torch.save writes a zip archive around a data.pkl; anything else (a pointer file, a config.json) would reach
    torch's legacy unpickler and fail with an error that names neither the file nor the mistake."""
    if not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as archive:
        return any(name.rsplit("/", 1)[-1] == "data.pkl" for name in archive.namelist())


def rng_state() -> dict:
    """torch (CPU and every CUDA device), numpy and python RNG states, in types torch.load(weights_only) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(state["python"])
