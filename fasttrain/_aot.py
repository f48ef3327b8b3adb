"""The Triton kernels compiled ahead of time and shipped in the wheel, handed to fasttrain._C's launcher.

A CUDA build runs tools/aot.py --shipped (CMakeLists.txt) and installs its output as fasttrain/kernels/aot/: an
index.json of every compiled case and, per arch, the cubins (sm_80/, sm_90/). At the first call that could take the
"aot" backend, `reason` reads the index once and registers each case of the device's arch with the C++ launcher
(fasttrain._C.aot_register: metadata and cubin bytes; the C++ side parses no JSON), which then finds a call's case by
an integer key and launches it with no Python (csrc/aot_launch.h). docs/backends.md describes the switches.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fasttrain import _extension

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
            _loaded[arch] = "no shipped cubins (fasttrain._C was built without CUDA)"
        else:
            try:
                _loaded[arch] = None if load(AOT_DIR, arch) else f"no shipped cubins for sm_{arch}"
            except Exception as e:  # cubins the launcher refuses (a stale or foreign build): the JIT serves
                _loaded[arch] = f"the shipped cubins did not load ({type(e).__name__}: {str(e)[:300]})"
    return _loaded[arch]


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
        _device_reason[device.index] = why
    return why
