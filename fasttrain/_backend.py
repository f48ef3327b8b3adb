"""One chooser for every op: cuda (csrc/*.cu), triton (kernels/), cpu (csrc/*.cpp), reference (plain PyTorch).

Each op builds an ordered map backend -> None (can serve these inputs) or a reason it cannot, and asks `choose`.
`backend="auto"` takes the first that can serve and warns once, with the reasons, when that is `reference` although
a faster one exists. A backend asked for by name that cannot serve raises. FASTTRAIN_BACKEND=<name> forces one for a
whole run; ops that do not have that backend at all keep choosing automatically.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from fasttrain import _extension

BACKENDS = ("cuda", "triton", "cpu", "reference")
AUTO = "auto"

_liveness_probes: dict[str, Callable[[], dict[str, str | None]]] = {}
_warned: set[tuple[str, str]] = set()


class NotForDevice(str):
    """A reason that only says the backend is not meant for this device (Triton on a CPU without the interpreter,
    the cuda backend on CPU tensors): the reference is then the intended path, not a fallback worth a warning.

    Each is a module constant, never built in a call: torch.compile traces the backend choice, and Dynamo under
    torch 2.11 cannot trace str.__new__ (the H200 run's warning), so a subclass built per call broke the graph at
    every op, and each break costs a graph's launch overhead."""


NEEDS_INTERPRETER = NotForDevice("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
CUDA_TAKES_CUDA = NotForDevice("the cuda backend takes CUDA tensors")
CPU_TAKES_CPU = NotForDevice("the cpu backend takes CPU tensors")


class BackendError(RuntimeError):
    """A backend asked for by name cannot serve the inputs."""


def register(op: str, probe: Callable[[], dict[str, str | None]]) -> None:
    """Declare an op's backends for `fasttrain info`: probe() -> backend -> None if live here, else why not."""
    _liveness_probes[op] = probe


def liveness() -> dict[str, dict[str, str | None]]:
    return {op: probe() for op, probe in sorted(_liveness_probes.items())}


def requested_backend(backend: str | None) -> str:
    """The backend argument, else FASTTRAIN_BACKEND, else auto; checked against the known names."""
    name = backend if backend not in (None, AUTO) else os.environ.get("FASTTRAIN_BACKEND", AUTO)
    if name != AUTO and name not in BACKENDS:
        source = "backend" if backend not in (None, AUTO) else "FASTTRAIN_BACKEND"
        raise ValueError(f"{source} must be one of {(AUTO,) + BACKENDS}, got {name!r}")
    return name


def choose(op: str, reasons: dict[str, str | None], backend: str | None = None) -> str:
    """Pick the backend for one call. `reasons` is ordered fastest first and always includes 'reference'."""
    name = requested_backend(backend)
    forced_by_env = backend in (None, AUTO) and name != AUTO
    if name != AUTO and (name in reasons or not forced_by_env):
        why = reasons.get(name, f"{op} has no {name!r} backend (it has {tuple(reasons)})")
        if why is not None:
            source = "FASTTRAIN_BACKEND" if forced_by_env else "backend"
            raise BackendError(f"{op}: {source}={name!r} cannot serve these inputs: {why}")
        return name
    for candidate, why in reasons.items():
        if why is None:
            if candidate == "reference":
                _warn_fallback(op, reasons)
            return candidate
    raise BackendError(f"{op}: no backend can serve these inputs: {reasons}")


def _warn_fallback(op: str, reasons: dict[str, str | None]) -> None:
    skipped = "; ".join(
        f"{b}: {why}" for b, why in reasons.items() if b != "reference" and not isinstance(why, NotForDevice)
    )
    if skipped and (op, skipped) not in _warned:
        _warned.add((op, skipped))
        warnings.warn(f"fasttrain: {op} runs on the reference backend ({skipped})", RuntimeWarning, stacklevel=4)


# What each backend needs, for the ops to compose into their `reasons`.

_triton_import: list[str | None] = []  # the first import's outcome


@torch.compiler.assume_constant_result  # a trace takes the value; functools.cache here made Dynamo warn per compile
def _triton_import_error() -> str | None:
    if not _triton_import:
        try:
            import triton  # noqa: F401

            _triton_import.append(None)
        except Exception as e:
            _triton_import.append(f"triton failed to import ({type(e).__name__}: {e})")
    return _triton_import[0]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_reason(device: torch.device) -> str | None:
    """None if Triton kernels can run on tensors of this device."""
    if (why := _triton_import_error()) is not None:
        return why
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if triton_interpreting() else NEEDS_INTERPRETER
    return f"Triton kernels do not run on {device.type} tensors"


def triton_tensor_reason(t: torch.Tensor) -> str | None:
    """None if Triton kernels can take this tensor: its device can run them (triton_reason) and it is not float64."""
    if (why := triton_reason(t.device)) is not None:
        return why
    if t.dtype == torch.float64:
        return "the kernels do not take float64"
    return None


def cuda_extension_reason(device: torch.device) -> str | None:
    """None if fasttrain._C has CUDA kernels usable for tensors of this device."""
    if device.type != "cuda":
        return CUDA_TAKES_CUDA
    if not _extension.available():
        return _extension.why_unavailable()
    if not _extension.built_with_cuda():
        return "fasttrain._C was built without CUDA (CPU torch, no nvcc, or FASTTRAIN_CUDA=0)"
    return None


def cpu_extension_reason(device: torch.device) -> str | None:
    """None if fasttrain._C's C++ CPU kernels can serve tensors of this device."""
    if device.type != "cpu":
        return CPU_TAKES_CPU
    return _extension.why_unavailable()


CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # attention_cpu and activation_cpu: in fp32


def cpu_kernel_reason(t: torch.Tensor, op_reason: str | None) -> str | None:
    """None if a C++ CPU kernel can take t: a CPU tensor of CPU_KERNEL_DTYPES, and op_reason (native_op_reason of
    the op that would be called, read once at import) None."""
    if t.device.type != "cpu":
        return cpu_extension_reason(t.device)  # NotForDevice
    if op_reason is not None:
        return op_reason
    if t.dtype not in CPU_KERNEL_DTYPES:
        return f"the CPU kernel takes fp32, bf16 or fp16, got {t.dtype}"
    return None


def native_op_reason(name: str) -> str | None:
    """None if fasttrain._C loaded and registered torch.ops.fasttrain.<name>."""
    if (why := _extension.why_unavailable()) is not None:
        return why
    if not hasattr(torch.ops.fasttrain, name):
        return f"fasttrain._C has no {name} op (stale build? reinstall)"
    return None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
