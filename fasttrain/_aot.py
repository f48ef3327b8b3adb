"""The Triton kernels compiled ahead of time and shipped in the wheel, handed to fasttrain._C's launcher.

A CUDA build runs tools/aot.py --shipped (CMakeLists.txt) and installs its output as fasttrain/kernels/aot/: an
index.json of every compiled case and, per arch, the cubins (sm_80/, sm_90/). At the first call that could take the
"aot" backend, `reason` reads the index once and registers each case of the device's arch with the C++ launcher
(fasttrain._C.aot_register: metadata and cubin bytes; the C++ side parses no JSON), which then finds a call's case by
an integer key and launches it with no Python (csrc/aot_launch.h). docs/backends.md describes the switches.

The tuner's choices (aot::tune, csrc/aot_launch.cpp, which owns them) persist per device in a JSON file in
FASTTRAIN_AOT_TUNE_DIR, else ~/.cache/fasttrain/aot_tune (FASTTRAIN_AOT_TUNE_CACHE=0 turns it off): read when
the device's cubins are registered, rewritten whole (fasttrain._files.atomic_write) after each new choice.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch

import fasttrain
from fasttrain import _extension
from fasttrain._files import atomic_write_text

AOT_DIR = Path(__file__).resolve().parent / "kernels" / "aot"

# The arch of the cubins a device runs: sm_90 cubins need exactly sm_90; sm_80 cubins run on every 8.x device.
_SHIPPED_ARCH = {(9, 0): 90, **{(8, minor): 80 for minor in range(10)}}

_loaded: dict[int, str | None] = {}  # arch -> why its cubins cannot serve (None: registered)
_device_reason: dict[int | None, str | None] = {}  # CUDA device index -> why the aot backend cannot serve it


def load(directory: Path | str = AOT_DIR, arch: int | None = None) -> int:
    """Register every case of directory/index.json (of `arch` only, when given) with fasttrain._C; the number
    registered. A case the C++ side does not accept (a kernel no op launches, parameters that moved) raises."""
    module, why = _extension.load()
    if module is None:
        raise RuntimeError(why)
    directory = Path(directory)
    entries = json.loads((directory / "index.json").read_text())
    count = 0
    for e in entries:
        if arch is not None and e["arch"] != arch:
            continue
        if e["launch_pdl"] or e["launch_cooperative_grid"]:
            raise ValueError(f"{e['cubin']}: the C++ launcher does not make PDL or cooperative launches")
        module.aot_register(
            e["kernel"],
            e["dtype"],
            [int(v) for v in e["constexprs"].values()],
            list(e["constexprs"]),
            [name for name, _ in e["args"]],
            [t for _, t in e["args"]],
            e["divisible_by_16"],
            e["launched_warps"],
            e["num_ctas"] or 1,
            e["shared"],
            e["cubin_params"],
            e["global_scratch_size"] or 0,
            e["profile_scratch_size"] or 0,
            e["entry"],
            e["case"],
            (directory / e["cubin"]).read_bytes(),
            global_scratch_align=e["global_scratch_align"] or 1,
        )
        count += 1
    return count


def _arch_reason(arch: int) -> str | None:
    if arch not in _loaded:
        other = next((a for a, why in _loaded.items() if why is None), None)
        if other is not None:  # the registry keys a case by kernel, dtypes and constexprs, not by arch
            _loaded[arch] = f"the sm_{other} cubins serve another device here (one arch per process)"
        elif not (AOT_DIR / "index.json").exists():
            _loaded[arch] = "no shipped cubins (a build without CUDA or with FASTTRAIN_AOT_ARCHS=none)"
        else:
            try:
                registered = load(AOT_DIR, arch)
                _loaded[arch] = (
                    None
                    if registered
                    else f"no shipped cubins for sm_{arch} (the build's FASTTRAIN_AOT_ARCHS left it out)"
                )
            except Exception as e:  # cubins the launcher refuses (a stale or foreign build): the JIT serves
                _loaded[arch] = f"the shipped cubins did not load ({type(e).__name__}: {str(e)[:300]})"
    return _loaded[arch]


def shipped_arch(device: torch.device) -> int | None:
    """The arch of the cubins that serve CUDA `device` (90 or 80), None for a device no cubins are shipped for."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _SHIPPED_ARCH.get(torch.cuda.get_device_capability(index))


def reason(device: torch.device) -> str | None:
    """None if the shipped cubins can serve CUDA tensors on `device` (extension built with CUDA, cubins for its arch,
    registered at the first ask); else why not. Read once per device."""
    why = _device_reason.get(device.index, "")  # a tensor's device has its index; torch.device("cuda") None
    if why == "":
        if not _extension.built_with_cuda():
            why = _extension.why_unavailable() or "fasttrain._C was built without CUDA"
        else:
            index = device.index if device.index is not None else torch.cuda.current_device()
            capability = torch.cuda.get_device_capability(index)
            arch = _SHIPPED_ARCH.get(capability)
            if arch is None:
                why = f"no cubins are shipped for sm_{capability[0]}{capability[1]} (the JIT serves it)"
            else:
                why = _arch_reason(arch)
        if why is None:
            attach_tune_cache(device_identity(index))
        _device_reason[device.index] = why
    return why


# ---- persisted tuning ------------------------------------------------------------------------------------------------

TUNE_FORMAT = 1
_tune: dict = {}  # "path", "identity" of the file this process's choices persist to, once attached


def tune_dir() -> Path:
    """Where the tuner's choices persist: FASTTRAIN_AOT_TUNE_DIR, else ~/.cache/fasttrain/aot_tune."""
    return Path(os.environ.get("FASTTRAIN_AOT_TUNE_DIR") or Path.home() / ".cache" / "fasttrain" / "aot_tune")


def device_identity(index: int) -> dict:
    """What a tuned choice holds for: the device's name and compute capability, the shipped cubins (a hash of
    index.json) and the fasttrain and torch versions (the keys hold torch's dtype numbers)."""
    major, minor = torch.cuda.get_device_capability(index)
    return {
        "device": torch.cuda.get_device_name(index),
        "capability": f"{major}.{minor}",
        "index": hashlib.sha256((AOT_DIR / "index.json").read_bytes()).hexdigest()[:16],
        "fasttrain": fasttrain.__version__,
        "torch": torch.__version__,
    }


def _warn(message: str) -> None:
    """A cache problem's one warning, never an error: under -W error (or a filter that raises) it is dropped, since it
    is raised inside an op call and the op goes on without the cache."""
    with contextlib.suppress(Warning):
        warnings.warn(message, stacklevel=3)


def tune_cache_path(identity: dict) -> Path:
    """The file of identity's choices: tune_dir()/<device>-sm<capability>-<hash of the identity>.json."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    device = re.sub(r"[^A-Za-z0-9]+", "_", identity["device"]).strip("_")
    return tune_dir() / f"{device}-sm{identity['capability'].replace('.', '')}-{digest}.json"


def _read_tune_file(path: Path, identity: dict, warn: bool) -> list[tuple[str, list[int], int]]:
    """The choices of path when it holds identity's (none if it does not exist); a file that does not parse, or holds
    another identity's, gives none and (warn) one warning: it is a cache, rewritten at the next choice."""
    try:
        data = json.loads(path.read_text())
        if data.get("format") != TUNE_FORMAT or data.get("identity") != identity:
            if warn:
                _warn(f"fasttrain: {path} holds another device's or build's aot tuning; ignored")
            return []
        return [(str(kernel), [int(v) for v in key], int(choice)) for kernel, key, choice in data["choices"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        if warn:
            _warn(f"fasttrain: ignoring the unreadable aot tuning cache {path} ({type(e).__name__})")
        return []


def attach_tune_cache(identity: dict) -> Path | None:
    """Persist the C++ tuner's choices for identity (the first device attached serves the process: the tuner's keys
    name no device): its file's choices taken where none is made yet, and the file rewritten after each new one. The
    file's path, or None when FASTTRAIN_AOT_TUNE_CACHE=0 or another identity is attached."""
    if os.environ.get("FASTTRAIN_AOT_TUNE_CACHE") == "0":
        return None
    module, why = _extension.load()
    if module is None:
        raise RuntimeError(why)
    if _tune:
        return _tune["path"] if _tune["identity"] == identity else None
    path = tune_cache_path(identity)
    module.aot_tune_preload(_read_tune_file(path, identity, warn=True))
    _tune.update(path=path, identity=identity, module=module)
    module.aot_tune_saver(_save_tune_choices)
    return path


def detach_tune_cache() -> None:
    """Stop persisting (tests; at exit, so that the C++ side holds no Python function past the interpreter)."""
    if _tune:
        _tune.pop("module").aot_tune_saver(None)
        _tune.clear()


atexit.register(detach_tune_cache)


def _save_tune_choices() -> None:
    """The C++ tuner's saver: the file rewritten with every choice, another process's kept where this one made none.
    Written whole to a temporary file beside it, then moved over it: a reader sees the old file or the new, never a
    part. A file that cannot be written stops the saving with one warning; the op goes on."""
    path, identity, module = _tune["path"], _tune["identity"], _tune["module"]
    choices = {(kernel, tuple(key)): choice for kernel, key, choice in _read_tune_file(path, identity, warn=False)}
    choices.update({(kernel, tuple(key)): choice for kernel, key, choice in module.aot_tune_choices()})
    data = {
        "format": TUNE_FORMAT,
        "identity": identity,
        "choices": [[kernel, list(key), choice] for (kernel, key), choice in sorted(choices.items())],
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data))
    except OSError as e:
        _warn(f"fasttrain: cannot write the aot tuning cache {path} ({e}); not saving it")
        detach_tune_cache()
