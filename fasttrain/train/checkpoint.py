"""Checkpoints: one file per step under RUN/checkpoints/, its checksum beside it, plus `latest` and `best` pointers.

Every file is written atomically (fasttrain.train.files), so a run killed mid-save leaves the previous checkpoint and
pointers intact; the partial temporary is swept up by the next save. step_N.pt.sha256 (`sha256sum -c` reads it) holds
the SHA-256 of step_N.pt, computed as it is written and checked at every load. No checkpoint holding a NaN or an inf
in a floating-point tensor is ever written. A checkpoint is data only (tensors, numbers, strings): what it holds is
the trainer's business (fasttrain.train.run), not this module's.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import re
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from fasttrain._files import atomic_write, atomic_write_text
from fasttrain.train.files import sweep_temporaries

_NAME = re.compile(r"^step_(\d{8})\.pt$")
POINTERS = ("latest", "best")
CHECKSUM = ".sha256"
"""Suffix of a checkpoint file's checksum sidecar: step_N.pt.sha256."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: damaged (checksum, archive) or of the wrong contents."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: str | Path, step: int, state: dict, keep_last: int, is_best: bool = False) -> Path:
    """Write state as step_<step>.pt with its checksum, point `latest` (and `best` if is_best) at it, keep the last
    keep_last + best. FloatingPointError, writing nothing, when a floating-point tensor of state is not finite."""
    folder = checkpoint_dir(run_dir)
    bad = first_non_finite(state)
    if bad is not None:
        kept = ""
        if (folder / "latest").is_file():
            kept = f"; {folder / 'latest'} still names {(folder / 'latest').read_text().strip()}"
        raise FloatingPointError(f"checkpoint of step {step} not written: {bad} holds a NaN or inf{kept}")
    folder.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(folder)  # left by a save that was killed
    path = folder / f"step_{step:08d}.pt"
    digest = hashlib.sha256()
    atomic_write(path, lambda f: _save_hashed(state, f, digest))
    write_checksum(path, digest.hexdigest())
    atomic_write_text(folder / "latest", path.name)
    if is_best:
        atomic_write_text(folder / "best", path.name)
    _prune(folder, keep_last)
    return path


def _save_hashed(state: dict, f, digest) -> None:
    """torch.save(state, f), feeding digest what it writes; a failed write raises its own OSError (a full disk, a
    read-only mount), not the RuntimeError torch wraps it in."""
    hashing = _Hashing(f, digest)
    try:
        torch.save(state, hashing)
    except RuntimeError:
        if hashing.error is not None:
            raise hashing.error from None
        raise


class _Hashing:
    """A write-only file that feeds what it writes to a hash on the way: the checksum costs no second read."""

    def __init__(self, f, digest):
        self.f, self.digest, self.error = f, digest, None

    def write(self, data) -> int:
        self.digest.update(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def write_checksum(path: Path, hexdigest: str) -> None:
    """path's sidecar, in sha256sum's format."""
    atomic_write_text(path.with_name(path.name + CHECKSUM), f"{hexdigest}  {path.name}\n")


def verify(path: Path) -> None:
    """CheckpointError naming path when its bytes differ from the checksum saved beside it (a file without a
    sidecar, written before checksums or by another tool, loads unverified)."""
    sidecar = path.with_name(path.name + CHECKSUM)
    if not sidecar.is_file():
        return
    expected = sidecar.read_text().split(maxsplit=1)[0] if sidecar.stat().st_size else ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: its bytes do not match its checksum ({sidecar.name})"
        )


def first_non_finite(state) -> str | None:
    """The name of the first floating-point tensor of state (nested dicts, lists) holding a NaN or inf, else None;
    one host sync per device."""
    named = list(_float_tensors(state, ""))
    flags = [(~t.detach().isfinite()).any() for _, t in named]
    by_device: dict = {}
    for flag in flags:
        by_device.setdefault(flag.device, []).append(flag)
    if not any(torch.stack(group).any().item() for group in by_device.values()):
        return None
    return next(name for (name, _), flag in zip(named, flags) if flag.item())


def _float_tensors(obj, name: str) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield name, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _float_tensors(value, f"{name}.{key}" if name else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _float_tensors(value, f"{name}[{i}]")


def _prune(folder: Path, keep_last: int) -> None:
    for p in prunable(folder, _NAME, keep_last):
        p.unlink()
        p.with_name(p.name + CHECKSUM).unlink(missing_ok=True)
    for sidecar in folder.glob(f"step_*.pt{CHECKSUM}"):  # a prune killed between a file and its sidecar
        if not sidecar.with_name(sidecar.name.removesuffix(CHECKSUM)).exists():
            sidecar.unlink(missing_ok=True)


def prunable(folder: Path, pattern: re.Pattern, keep_last: int) -> list[Path]:
    """The checkpoints in folder (names matching pattern) that are neither among the last keep_last nor named by a
    pointer."""
    steps = sorted(p for p in folder.iterdir() if pattern.match(p.name))
    keep = {p.name for p in steps[-keep_last:]}
    keep.update((folder / name).read_text().strip() for name in POINTERS if (folder / name).is_file())
    return [p for p in steps if p.name not in keep]


def step_files(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint files, newest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), reverse=True)


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


def load(
    path: str | Path, which: str = "latest", map_location: str | torch.device = "cpu", require: Iterable[str] = ()
) -> dict:
    """The state dict saved by `save`, from a checkpoint file or a run directory's `which` pointer, its checksum
    verified; CheckpointError naming the file when it is damaged or lacks one of the keys in `require`."""
    return load_file(resolve(path, which), map_location, require)


def load_file(file: Path, map_location: str | torch.device = "cpu", require: Iterable[str] = ()) -> dict:
    if not _is_torch_archive(file):
        raise CheckpointError(f"{str(file)!r} is not a fasttrain checkpoint (not an archive written by torch.save)")
    verify(file)
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings), never code to unpickle.
        state = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{str(file)!r} is not a fasttrain checkpoint (it holds objects other than tensors, numbers and strings)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {str(file)!r} is damaged and cannot be read ({first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(file)!r} is not a fasttrain checkpoint (it holds a {type(state).__name__})")
    missing = [key for key in require if key not in state]
    if missing:
        raise CheckpointError(f"{str(file)!r} is not a fasttrain run's checkpoint: it has no {missing[0]!r} entry")
    return state


def load_latest_good(
    run_dir: str | Path, warn: Callable[[str], None], map_location="cpu", require: Iterable[str] = ()
) -> tuple[Path, dict]:
    """(file, state) of `latest`, or, when that file is damaged or missing, of the newest older checkpoint that loads
    (warn(line) says which was passed over); CheckpointError naming latest's file when none does."""
    pointer = checkpoint_dir(run_dir) / "latest"
    try:
        first = resolve(run_dir, "latest")
    except ValueError as e:
        if not pointer.is_file():  # no run to resume: the caller's error
            raise
        first, error = None, str(e)
    if first is not None:
        try:
            return first, load_file(first, map_location, require)
        except CheckpointError as e:
            error = str(e)
    for older in step_files(run_dir):
        if first is not None and older.name >= first.name:
            continue
        try:
            state = load_file(older, map_location, require)
        except CheckpointError:
            continue
        warn(f"{error}; resuming from the previous good one, {older.name}")
        return older, state
    raise CheckpointError(error)


def check_model_state(model: torch.nn.Module, state: dict, file: str | Path) -> None:
    """CheckpointError naming the first parameter or buffer that a checkpoint's model state lacks, has extra, or
    holds in another shape than `model`."""
    want = model.state_dict()
    for key, tensor in want.items():
        if key not in state:
            raise CheckpointError(f"checkpoint {str(file)!r} does not fit the run's model: it has no {key!r}")
        if not isinstance(state[key], torch.Tensor) or state[key].shape != tensor.shape:
            got = tuple(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
            raise CheckpointError(
                f"checkpoint {str(file)!r} does not fit the run's model: {key} is {got}, the model's is "
                f"{tuple(tensor.shape)}"
            )
    extra = next((key for key in state if key not in want), None)
    if extra is not None:
        raise CheckpointError(f"checkpoint {str(file)!r} does not fit the run's model: it has an unknown {extra!r}")


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
