"""One dispatcher for every op and the optimizer.

Each op declares its backends in one `Table`: an ordered map, fastest first, from a backend's name to a `Backend`,
that is, a `reason(*args)` (None when the backend can serve these inputs, else why not) and its implementation, the
object the op's registered body calls (`forward`, `backward`, whatever the op's shape needs), or a `direct` op that
serves the whole call itself (its own schema, fake implementation and autograd: a C++ op launching precompiled
kernels). `Table.choose` is the only chooser: `backend="auto"` takes the first that can serve and warns once, with
the reasons, when that is `reference` although a faster one exists here; a backend asked for by name that cannot
serve raises `BackendError`; FASTTRAIN_BACKEND=<name> forces one for a whole run (ops without that backend keep
choosing automatically). The reference is a column like the others: plain PyTorch, the test oracle and the
fallback. docs/adding-an-op.md walks a new op through.

This module is also where the ops read the backend switches (FASTTRAIN_BACKEND, FASTTRAIN_AOT, TRITON_INTERPRET; the
kernels read the latter in kernels/_launch.py) and the only loader of the Triton kernels (`kernels`), which are
imported on first use: a process that never launches one never imports Triton's compiler.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch.autograd import forward_ad

from fasttrain import _extension

BACKENDS = ("cuda", "aot", "triton", "cpu", "reference")
AUTO = "auto"


FORWARD_AD = "an input carries a forward-mode AD tangent, which only the reference's plain PyTorch propagates"


def _carries_tangent(args) -> bool:
    """Whether forward-mode AD (torch.autograd.forward_ad) is on and an argument is a dual tensor: the kernels'
    autograd is backward-only, and a custom op without a forward derivative drops the tangent without an error."""
    if forward_ad._current_level < 0:  # no dual level entered: the common case, one global read
        return False
    return any(isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args)


class NotForDevice(str):
    """A reason that only says the backend is not meant for this device (Triton on a CPU without the interpreter,
    the cuda backend on CPU tensors): the reference is then the intended path, not a fallback worth a warning.

    Each is a module constant, never built in a call: torch.compile traces the backend choice, and Dynamo cannot
    trace str.__new__ on a str subclass (torch 2.11), so one built per call would break the graph at every op."""


NEEDS_INTERPRETER = NotForDevice("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
CUDA_TAKES_CUDA = NotForDevice("the cuda backend takes CUDA tensors")
CPU_TAKES_CPU = NotForDevice("the cpu backend takes CPU tensors")
AOT_TAKES_CUDA = NotForDevice("the aot backend takes CUDA tensors")
AOT_OFF = NotForDevice("FASTTRAIN_AOT=0 (the Triton JIT serves)")


class BackendError(RuntimeError):
    """A backend asked for by name cannot serve the inputs."""


class ArgumentError(ValueError, RuntimeError):
    """A wrong argument value or shape given to a function with flash-attn's or torch's signature. A ValueError, as
    fasttrain raises for a wrong value, and a RuntimeError, as flash-attn's checks (TORCH_CHECK) and torch's
    scaled_dot_product_attention raise: code written against either catches it."""


class ArgumentTypeError(TypeError, RuntimeError):
    """A wrong argument type or dtype given to a function with flash-attn's or torch's signature: a TypeError, as
    fasttrain raises for a wrong type, and a RuntimeError, as flash-attn and torch raise (see ArgumentError)."""


def always(*args, **kwargs) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Backend:
    """One column of an op's table."""

    reason: Callable[..., str | None]
    """(the op's arguments, as the op passes them to Table.choose) -> None if this backend can serve them, else why
    not: a module constant or a NotForDevice where the backend is simply not meant for this device."""
    impl: Any = None
    """What the op's registered body calls for this backend (an object with the op's forward/backward functions)."""
    live: Callable[[], str | None] = always
    """() -> None if the backend can run on this machine's default device, else why not (for `fasttrain info`)."""
    direct: Callable | None = None
    """An op that serves the whole call in place of the registered one, called with the registered op's arguments
    less the backend's name: its own schema, fake implementation and autograd (a C++ op launching precompiled
    kernels), so the call costs no Python body and no Python autograd (fasttrain.ops._op.Op hands it over)."""


_tables: dict[str, Table] = {}


class Table:
    """An op's backends, fastest first; the last is always `reference`."""

    def __init__(self, op: str, backends: dict[str, Backend]):
        if list(backends)[-1:] != ["reference"] or not set(backends) <= set(BACKENDS):
            raise ValueError(f"{op}: backends must be among {BACKENDS} and end with 'reference', got {list(backends)}")
        self.op, self.backends = op, backends
        self.direct = {name: b.direct for name, b in backends.items() if b.direct is not None}
        self._warned: set[str] = set()
        _tables[op] = self

    def __getitem__(self, name: str) -> Any:
        """The implementation of backend `name`."""
        return self.backends[name].impl

    def reasons(self, *args) -> dict[str, str | None]:
        """backend -> why it cannot serve these arguments (None: it can), for every backend."""
        return {name: b.reason(*args) for name, b in self.backends.items()}

    def choose(self, *args, backend: str | None = None) -> str:
        """The backend for one call with these arguments (see the module docstring)."""
        name = requested_backend(backend)
        if _carries_tangent(args):
            if name not in (AUTO, "reference") and (backend not in (None, AUTO) or name in self.backends):
                raise BackendError(f"{self.op}: backend={name!r} cannot serve these inputs: {FORWARD_AD}")
            return "reference"
        forced_by_env = backend in (None, AUTO) and name != AUTO
        if name != AUTO and (name in self.backends or not forced_by_env):
            if name not in self.backends:
                why = f"{self.op} has no {name!r} backend (it has {tuple(self.backends)})"
            else:
                why = self.backends[name].reason(*args)
            if why is not None:
                source = "FASTTRAIN_BACKEND" if forced_by_env else "backend"
                raise BackendError(f"{self.op}: {source}={name!r} cannot serve these inputs: {why}")
            return name
        skipped = {}
        for candidate, b in self.backends.items():
            why = b.reason(*args)
            if why is None:
                if candidate == "reference":
                    self._warn_fallback(skipped)
                return candidate
            skipped[candidate] = why
        raise AssertionError("unreachable: the reference serves every input")

    def _warn_fallback(self, skipped: dict[str, str]) -> None:
        if torch.compiler.is_compiling():  # a warning inside a trace breaks the graph; the eager call warns
            return
        text = "; ".join(f"{b}: {why}" for b, why in skipped.items() if not isinstance(why, NotForDevice))
        if text and text not in self._warned:
            self._warned.add(text)
            warnings.warn(f"fasttrain: {self.op} runs on the reference backend ({text})", RuntimeWarning, stacklevel=4)

    def liveness(self) -> dict[str, str | None]:
        return {name: b.live() for name, b in self.backends.items()}


def liveness() -> dict[str, dict[str, str | None]]:
    """op -> backend -> None if live on this machine, else why not (`fasttrain info`)."""
    import fasttrain.ops  # noqa: F401  (declares the ops' tables)
    import fasttrain.optim  # noqa: F401

    return {op: _tables[op].liveness() for op in sorted(_tables)}


def requested_backend(backend: str | None) -> str:
    """The backend argument, else FASTTRAIN_BACKEND, else auto; checked against the known names."""
    name = backend if backend not in (None, AUTO) else os.environ.get("FASTTRAIN_BACKEND", AUTO)
    if name != AUTO and name not in BACKENDS:
        source = "backend" if backend not in (None, AUTO) else "FASTTRAIN_BACKEND"
        raise ValueError(f"{source} must be one of {(AUTO, *BACKENDS)}, got {name!r}")
    return name


# os.environ's own store, keyed and valued as os.environ encodes them: the short paths ask on every call, and a lookup
# there gives os.environ.get's answer without its encode and decode (os.environ keeps the store current).
_FORCE_KEY = os.environ.encodekey("FASTTRAIN_BACKEND")
_AUTO_VALUE = os.environ.encodevalue(AUTO)


def forced() -> bool:
    """True if FASTTRAIN_BACKEND names a backend (set, and not auto): what requested_backend(None) reads, read
    cheaply enough for the ops' short paths, which leave such a call to `Table.choose`."""
    store = getattr(os.environ, "_data", None)
    if store is None:  # os.environ replaced by a plain mapping
        return os.environ.get("FASTTRAIN_BACKEND", AUTO) != AUTO
    value = store.get(_FORCE_KEY)
    return value is not None and value != _AUTO_VALUE


def intercepted() -> bool:
    """True while Dynamo traces or a TorchFunctionMode is active: the C++ short paths call the dispatcher directly, so
    either would miss their ops; such calls take the general path, which goes through `torch.ops`."""
    return torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()


# ---- the kernels -----------------------------------------------------------------------------------------------------

_kernel_modules: dict[str, ModuleType] = {}


def kernels(family: str) -> ModuleType:
    """fasttrain.kernels.<family>, imported at its first launch: a process that never launches a Triton kernel never
    imports Triton's compiler."""
    module = _kernel_modules.get(family)
    if module is None:
        module = _kernel_modules[family] = importlib.import_module(f"fasttrain.kernels.{family}")
    return module


# ---- what each backend needs, for the ops' reasons -------------------------------------------------------------------

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
    """Whether Triton kernels run in its interpreter (TRITON_INTERPRET=1), which serves CPU tensors."""
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


def triton_live() -> str | None:
    """None if Triton kernels can run on this machine's default device (`fasttrain info`)."""
    return triton_reason(default_device())


def triton_tensor_reason(t: torch.Tensor) -> str | None:
    """None if Triton kernels can take this tensor: its device can run them (triton_reason) and it is not float64."""
    if (why := triton_reason(t.device)) is not None:
        return why
    if t.dtype == torch.float64:
        return "the kernels do not take float64"
    return None


def aot_reason(device: torch.device) -> str | None:
    """None if Triton kernels compiled ahead of time (shipped in a CUDA build's wheel, fasttrain/_aot.py) can be
    launched from C++ for tensors of this device: a CUDA device whose arch has shipped cubins, FASTTRAIN_AOT not 0."""
    if device.type != "cuda":
        return AOT_TAKES_CUDA
    if os.environ.get("FASTTRAIN_AOT") == "0":
        return AOT_OFF
    from fasttrain import _aot

    return _aot.reason(device)


def aot_arch(device: torch.device) -> int | None:
    """The arch of the shipped cubins that serve `device` (fasttrain/_aot.py), None off CUDA or for an arch without."""
    if device.type != "cuda":
        return None
    from fasttrain import _aot

    return _aot.shipped_arch(device)


def aot_live() -> str | None:
    """None if the aot backend can serve this machine's default device (`fasttrain info`)."""
    return aot_reason(default_device())


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


CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the C++ CPU kernels compute in fp32


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
    """None if fasttrain._C loaded and registered torch.ops.fasttrain.<name>. Read once, at an op module's import:
    Dynamo cannot trace the extension's import."""
    if (why := _extension.why_unavailable()) is not None:
        return why
    if not hasattr(torch.ops.fasttrain, name):
        return f"fasttrain._C has no {name} op (stale build? reinstall)"
    return None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
