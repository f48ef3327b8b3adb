"""`fasttrain info`: versions, device, and which backends are live for each op."""

from __future__ import annotations

import os
import platform

import torch

from fasttrain import _backend, _extension


def cpu_name() -> str:
    """The CPU's model name: /proc/cpuinfo's on Linux, where platform.processor() is empty; else that, else the
    architecture."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report() -> str:
    import fasttrain

    lines = [f"fasttrain {fasttrain.__version__}", f"python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as e:
        lines.append(f"triton unavailable ({type(e).__name__}: {e})")
    lines.append(f"CUDA (torch build) {torch.version.cuda or 'none'}")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        lines.append(f"device cuda: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})")
    else:
        lines.append(f"device cpu: {cpu_name()}, {torch.get_num_threads()} threads")
    ext = _extension.load()[0]
    if ext is None:
        lines.append(f"extension: unavailable: {_extension.why_unavailable()}")
    else:
        lines.append(
            f"extension fasttrain._C: loaded, CUDA kernels {'built' if ext.built_with_cuda() else 'not built'}, "
            f"OpenMP threads {ext.openmp_max_threads()}, CPU attention tiles through {ext.cpu_tile_blas()}"
        )
    lines.append(f"TRITON_INTERPRET={'1' if _backend.triton_interpreting() else 'unset'}")
    if "FASTTRAIN_BACKEND" in os.environ:  # forces every op: a bad value fails every call, so say so here
        try:
            lines.append(f"FASTTRAIN_BACKEND={_backend.requested_backend(None)} (forces every op)")
        except ValueError as e:
            lines.append(f"FASTTRAIN_BACKEND: {e}")
    lines.append("backends per op (live, or why not):")
    for op, backends in _backend.liveness().items():
        lines.append(f"  {op}")
        for name, why in backends.items():
            lines.append(f"    {name:<10} {'live' if why is None else 'off: ' + why}")
    return "\n".join(lines)
