"""Host time per call of each fasttrain op on a tiny input, where the kernels take microseconds and the host's Python,
dispatch and launches set the pace: fasttrain against torch's op for the same job, forward and forward + backward,
beside an empty Triton kernel's launch (the floor under any Triton-backed op), on CUDA the driver calls Triton's
launcher makes at each launch (driver_call_rows), and fasttrain's own Python on its
Triton path with every launch skipped (impl "fasttrain, no launch": each kernel object swapped for one whose
`kernel[grid](...)` does nothing, so its outputs are garbage and only its time is kept; on a CPU this runs in a child
process with the Triton backend forced, the one way to time that path's Python without a GPU, and on CUDA the gap to
the "fasttrain" row is Triton's launcher and the driver); the norms, rotary, cross-entropy and decode on their aot
path (the kernels compiled ahead of time and launched from C++) with every launch dropped once packed (impl
"fasttrain aot, no launch", aot_launches_dropped), on a CPU too (decode's skipped there: the CPU case's caches are
fp32, its cubins fp16 and bf16); then a cProfile of fasttrain's LayerNorm forward + backward.

    python -m fasttrain.benchmarks.bench_overhead [--device cpu|cuda] [--quick] [--out DIR]

Why: on a GPU a small op's kernels can take a fraction of its wall time (benchmarks/NOTES.md, Host time per op
call), and the model's step runs dozens of such ops per layer. Timing: many calls back to back, then
one synchronize; on CUDA each tiny kernel ends long before the host issues the next, so wall time over calls is the
host's cost per call; `x torch` is torch's host time over fasttrain's (above 1: fasttrain's host costs less). On a CPU
attention, decode and rotary run their C++ kernels and the other ops their references, so the rows there measure
fasttrain's checks and autograd wrapper around a kernel or torch's op.
"""

from __future__ import annotations

import contextlib
import cProfile
import importlib
import inspect
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fasttrain.benchmarks import common
from fasttrain.ops import (
    add_layer_norm,
    apply_rotary_emb,
    cross_entropy,
    flash_attn_func,
    flash_attn_with_kvcache,
    layer_norm,
)
from fasttrain.ops.rotary import apply_rotary_emb_reference

B, T, H, D, C, V, CACHE = 1, 16, 12, 64, 768, 512, 256
KERNEL_MODULES = ("attention", "attention_backward", "cross_entropy", "decode", "norms", "rotary")
NO_LAUNCH = "fasttrain, no launch"
AOT_NO_LAUNCH = "fasttrain aot, no launch"
AOT_OPS = ("layer_norm", "add_layer_norm", "rotary", "cross_entropy", "decode")  # the ops with an aot column
# Their kernel modules (kernels/<name>.py aot_kernels(shipped=True)).
AOT_MODULES = ("norms", "rotary", "cross_entropy", "decode")


def host_us(fn, device: str, calls: int, reps: int = 5) -> float:
    """Median over reps of (wall time of `calls` back-to-back calls, then one synchronize) / calls, in us."""
    for _ in range(10):
        fn()
    common.synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        common.synchronize(device)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(times)[reps // 2]


def cases(device: str) -> dict:
    """name -> (inputs requiring grad, fasttrain fn, torch fn): each fn maps the inputs to a tensor or a tuple."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=dt).requires_grad_()

    rows, branch, w, b = (
        rand(B * T, C, dt=torch.float32),
        rand(B * T, C),
        rand(C, dt=torch.float32),
        rand(C, dt=torch.float32),
    )
    q, k, v = rand(B, T, H, D), rand(B, T, H, D), rand(B, T, H, D)
    cos, sin = torch.rand(T, D // 2, generator=g, device=device), torch.rand(T, D // 2, generator=g, device=device)
    logits, targets = rand(B * T, V), torch.randint(0, V, (B * T,), generator=g, device=device)
    k_cache, v_cache = (torch.randn(B, CACHE, H, D, generator=g, device=device, dtype=dtype) for _ in range(2))
    q1 = q.detach()[:, :1]  # (B, 1, H, D): one new token against a full cache of CACHE rows
    seqlens = torch.full((B,), CACHE, dtype=torch.int32, device=device)

    def sdpa(q, k, v):  # (B, T, H, D) in and out, as flash_attn_func
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)

    return {
        "layer_norm": (
            (rows, w, b),
            lambda x, w, b: layer_norm(x, (C,), w, b),
            lambda x, w, b: F.layer_norm(x, (C,), w, b),
        ),
        "add_layer_norm": (
            (branch, rows, w, b),
            lambda x, r, w, b: add_layer_norm(x, r, (C,), w, b),
            lambda x, r, w, b: common.eager_add_norm(F.layer_norm)(x, r, (C,), w, b),
        ),
        "rotary": ((q,), lambda x: apply_rotary_emb(x, cos, sin), lambda x: apply_rotary_emb_reference(x, cos, sin)),
        "attention": ((q, k, v), lambda q, k, v: flash_attn_func(q, k, v, causal=True), sdpa),
        "cross_entropy": (
            (logits,),
            lambda x: cross_entropy(x, targets),
            lambda x: F.cross_entropy(x.float(), targets),
        ),
        "decode": (
            (),
            lambda: flash_attn_with_kvcache(q1, k_cache, v_cache, cache_seqlens=seqlens, check_lengths=False),
            lambda: F.scaled_dot_product_attention(
                q1.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
            ).transpose(1, 2),
        ),
    }


def outputs(fn, inputs) -> tuple:
    out = fn(*inputs)
    return out if isinstance(out, tuple) else (out,)


def check_correct(name: str, inputs, ours, theirs, device: str) -> float:
    err = max(
        ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1)).item()
        for a, b in zip(outputs(ours, inputs), outputs(theirs, inputs))
    )
    bound = 3e-2 if device == "cuda" else 1e-4  # bf16 on CUDA, fp32 on CPU
    if not err < bound:
        raise AssertionError(f"{name}: fasttrain differs from torch by {err:.3g} (bound {bound})")
    return err


@triton.jit
def _empty_kernel(A, B_, C_, D_, E, F_, n0, n1, n2, n3, BLOCK: tl.constexpr):
    pass  # module level: the JIT reads the annotation `tl.constexpr` among the module's globals, not a function's


def launch_floor_rows(device: str, calls: int) -> list[dict]:
    """Host us per launch of an empty Triton kernel with six tensor and four int arguments (a norm's count)."""
    if device != "cuda":
        return []
    ts = [torch.empty(16, device=device) for _ in range(6)]
    us = host_us(lambda: _empty_kernel[(1,)](*ts, 1, 2, 3, 4, BLOCK=128), device, calls)
    return [{"op": "empty triton kernel", "mode": "launch", "impl": "triton", "host_us": us}]


def driver_call_rows(device: str, calls: int) -> list[dict]:
    """Host us per call of the driver calls Triton's C launcher makes at every launch besides the launch itself
    (triton 3.6 and 3.7, backends/nvidia/driver.py): cuCtxGetCurrent once, cuPointerGetAttribute once per pointer
    argument (8 for a norm forward). Through ctypes, whose own cost is included. Why: Triton's Python alone (the
    driver mocked) is a small part of an op's host time on a GPU machine (benchmarks/NOTES.md, Host time per op
    call); these rows time the rest of a launch. A failed call is a row that says so, not a lost run."""
    if device != "cuda":
        return []
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return [{"op": "driver calls", "mode": "driver call", "impl": "ctypes", "skipped": f"libcuda: {e}"}]
    cuda.cuPointerGetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
    cuda.cuCtxGetCurrent.argtypes = [ctypes.c_void_p]
    t = torch.empty(16, device=device)
    out, ctx = ctypes.c_uint64(), ctypes.c_void_p()
    calls_by_name = {
        # 3: CU_POINTER_ATTRIBUTE_DEVICE_POINTER, what the launcher asks
        "cuPointerGetAttribute": lambda: cuda.cuPointerGetAttribute(ctypes.byref(out), 3, t.data_ptr()),
        "cuCtxGetCurrent": lambda: cuda.cuCtxGetCurrent(ctypes.byref(ctx)),
    }
    rows = []
    for name, call in calls_by_name.items():
        row = {"op": name, "mode": "driver call", "impl": "ctypes"}
        try:
            status = call()
        except ctypes.ArgumentError as e:
            status = f"{type(e).__name__}: {e}"
        if status != 0:
            row["skipped"] = f"returned {status}"
        else:
            row["host_us"] = host_us(call, device, calls)
        rows.append(row)
    return rows


def profile_layer_norm(device: str, calls: int, top: int = 15) -> list:
    """cProfile of fasttrain's LayerNorm forward + backward: [function, self us per call, calls per call]."""
    inputs, ours, _ = cases(device)["layer_norm"]
    fwd_bwd = forward_backward(ours, inputs)
    fwd_bwd()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fwd_bwd()
    common.synchronize(device)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, fn): (primitive calls, calls, self s, cumulative s, ...)}
    ranked = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [
        [f"{Path(file).name}:{line}({fn})", round(tt / calls * 1e6, 2), round(nc / calls, 2)]
        for (file, line, fn), (_, nc, tt, _, _) in ranked
    ]


class _NoLaunch:
    """Stands in for a Triton kernel or autotuner: `kernel[grid](*args)` returns at once."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def launches_skipped():
    """Every Triton kernel of fasttrain.kernels swapped for a _NoLaunch while inside; restored after. Each plan tuner
    (the attention backward's) starts empty inside and gets its own choices back after: plans of skipped launches
    time as noise, and what it picks from them must not outlive the context."""
    import triton

    from fasttrain.kernels._launch import PlanTuner

    swapped, tuners = [], []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"fasttrain.kernels.{name}")
        for attr, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.KernelInterface):
                swapped.append((module, attr, value))
                setattr(module, attr, _NoLaunch())
            elif isinstance(value, PlanTuner):
                tuners.append((value, value.cache, value.configs_timings))
                value.cache = {}
    try:
        yield
    finally:
        for module, attr, value in swapped:
            setattr(module, attr, value)
        for tuner, cache, timings in tuners:
            tuner.cache, tuner.configs_timings = cache, timings


def _register_described(dtype: torch.dtype, modules=AOT_MODULES) -> None:
    """Launch-less registry entries for the shipped cases in dtype of modules (kernels/<name>.py), made from the
    kernels' description (aot_kernels(shipped=True), with tools/aot.py's signature rules): what a CPU build, which
    ships no cubins, needs for the C++ op path to run with its launches dropped. No cubin is ever read."""
    from fasttrain import _C

    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    for entry in (e for m in modules for e in _kernel_module(m).aot_kernels(90, name, shipped=True)):
        kernel = entry["kernel"]
        # kernel.fn's annotations: the interpreter's stand-in for a JITFunction (TRITON_INTERPRET=1) has no .params
        parameters = inspect.signature(kernel.fn).parameters.values()
        constexprs = [p.name for p in parameters if "constexpr" in str(p.annotation)]
        args = [p.name for p in parameters if "constexpr" not in str(p.annotation)]
        types = [entry["types"].get(a) or (f"*{name}" if a[0].isupper() else "i32") for a in args]
        # compiled 16-divisible, as tools/aot.py compiles them: the entry's own list, else its default rule
        divisible = entry.get("divisible") or [
            a for a in args if a[0].isupper() or (a.startswith("stride_") and not a.startswith("stride_l"))
        ]
        for case in entry["cases"]:
            values = [int(case["constexprs"][c]) for c in constexprs]
            _C.aot_register(
                kernel.__name__,
                name,
                values,
                constexprs,
                args,
                types,
                divisible,
                case["num_warps"],
                1,
                0,
                len(args) + 2,
                0,
                0,
                kernel.__name__,
                case["label"],
                b"",
            )


@contextlib.contextmanager
def aot_launches_dropped(device: str, dtypes, modules=AOT_MODULES):
    """The aot columns serving this device, each launch packed and checked in C++ and then dropped
    (fasttrain._C's recorder with keep=False): the C++ op path's host time without the launch. Where no cubins are
    registered (a CPU), launch-less entries for dtypes of modules' shipped kernels stand in (_register_described);
    the registry is emptied after."""
    from fasttrain import _C, _backend

    described = _C.aot_registered() == 0
    if described:
        for dtype in dtypes:
            _register_described(dtype, modules)
    reason = _backend.aot_reason
    _backend.aot_reason = lambda device: None
    _C.aot_record(True, 132, keep=False)
    try:
        yield
    finally:
        _C.aot_record(False, 0)
        _backend.aot_reason = reason
        if described:
            _C.aot_clear()


def _kernel_module(name: str):
    return importlib.import_module(f"fasttrain.kernels.{name}")


def _aot_why(name: str, inputs, device: str) -> str | None:
    """Why the aot column does not take case `name`'s inputs (None: it does)."""
    from fasttrain.ops.cross_entropy import CROSS_ENTROPY
    from fasttrain.ops.norms import NORMS
    from fasttrain.ops.rotary import ROTARY

    if name == "cross_entropy":
        return CROSS_ENTROPY.reasons(inputs[0], -100)["aot"]
    if name == "decode":  # cases()'s call: one token against a full cache, nothing appended
        from fasttrain.ops.decode import DECODE

        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        q, cache = (torch.empty(B, n, H, D, dtype=dtype, device=device) for n in (1, CACHE))
        return DECODE.reasons(q, cache, cache, None, None, None, 0.0, None, 0)["aot"]
    if name == "rotary":
        tables = torch.empty(T, D // 2, device=inputs[0].device)  # cases()'s cos and sin: fp32 (T, D/2)
        return ROTARY.reasons(inputs[0], tables, tables, None, False)["aot"]
    x, residual, weight, bias = (inputs[0], None, *inputs[1:]) if len(inputs) == 3 else inputs
    return NORMS.reasons(x, C, residual, weight, bias)["aot"]


def aot_no_launch_rows(device: str, calls: int) -> list[dict]:
    """The "fasttrain aot, no launch" rows of AOT_OPS whose inputs the aot column takes."""
    rows = []
    all_cases = cases(device)
    # the inputs' dtypes, and the case dtype of decode, which takes no inputs (its caches are the case's dtype)
    dtypes = {t.dtype for name in AOT_OPS for t in all_cases[name][0]} | {
        torch.bfloat16 if device == "cuda" else torch.float32
    }
    with aot_launches_dropped(device, dtypes):
        for name in AOT_OPS:
            inputs, ours, _ = all_cases[name]
            why = _aot_why(name, inputs, device)
            if why is not None:
                rows.append({"op": name, "mode": "-", "impl": AOT_NO_LAUNCH, "skipped": why})
                continue
            for mode, us in time_modes(inputs, ours, device, calls).items():
                rows.append({"op": name, "mode": mode, "impl": AOT_NO_LAUNCH, "host_us": us})
    return rows


def forward_backward(fn, inputs):
    """A call of fn on inputs and the gradients of its outputs, with upstream gradients of ones (a sum's)."""

    def run():
        outs = outputs(fn, inputs)
        torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs])

    return run


def time_modes(inputs, fn, device: str, calls: int) -> dict[str, float]:
    """mode -> host us per call of fn on inputs: "fwd" under no_grad, "fwd+bwd" (when inputs take a gradient)."""

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    modes = (("fwd", fwd), ("fwd+bwd", forward_backward(fn, inputs))) if inputs else (("fwd", fwd),)
    return {mode: host_us(run, device, calls) for mode, run in modes}


def time_no_launch(device: str, calls: int) -> list[dict]:
    """The "fasttrain, no launch" rows, timed in this process."""
    rows = []
    with launches_skipped():
        for name, (inputs, ours, _) in cases(device).items():
            for mode, us in time_modes(inputs, ours, device, calls).items():
                rows.append({"op": name, "mode": mode, "impl": NO_LAUNCH, "host_us": us})
    return rows


def no_launch_rows(device: str, calls: int) -> list[dict]:
    """time_no_launch on CUDA; on a CPU in a child with TRITON_INTERPRET=1 and FASTTRAIN_BACKEND=triton (the
    interpreter must be on before fasttrain.kernels is imported, and only the child may take it)."""
    if device != "cpu":
        return time_no_launch(device, calls)
    # PYTHONSAFEPATH: a source checkout in the working directory must not shadow the installed fasttrain.
    env = dict(os.environ, TRITON_INTERPRET="1", FASTTRAIN_BACKEND="triton", PYTHONSAFEPATH="1")
    child = subprocess.run(
        [sys.executable, "-m", __spec__.name, "--no-launch-rows", str(calls)], env=env, capture_output=True, text=True
    )
    if child.returncode != 0:
        raise RuntimeError(f"the no-launch child failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--no-launch-rows"]:  # the child of no_launch_rows on a CPU
        print(json.dumps(time_no_launch("cpu", int(sys.argv[2]))))
        return
    args = common.parse_args(__doc__.splitlines()[0])
    device = args.device
    calls = 50 if args.quick else 500
    rows = []
    skipped = {(r["op"], r["mode"]): r["host_us"] for r in no_launch_rows(device, calls)}
    aot = aot_no_launch_rows(device, calls)
    aot_us = {(r["op"], r["mode"]): r["host_us"] for r in aot if "host_us" in r}
    for name, (inputs, ours, theirs) in cases(device).items():
        err = check_correct(name, inputs, ours, theirs, device)
        times = {impl: time_modes(inputs, fn, device, calls) for impl, fn in (("torch", theirs), ("fasttrain", ours))}
        for mode in times["torch"]:
            entries = [
                ("torch", times["torch"][mode]),
                ("fasttrain", times["fasttrain"][mode]),
                (NO_LAUNCH, skipped[name, mode]),
            ]
            if (name, mode) in aot_us:
                entries.append((AOT_NO_LAUNCH, aot_us[name, mode]))
            for impl, us in entries:
                rows.append(
                    {
                        "op": name,
                        "mode": mode,
                        "impl": impl,
                        "host_us": us,
                        "x torch": times["torch"][mode] / us,
                        "rel_err": err if impl not in (NO_LAUNCH, AOT_NO_LAUNCH) else None,
                    }
                )
    common.print_table(rows, ["op", "mode", "impl", "host_us", "x torch"])  # before the extras: a failure there
    # must not take these rows with it
    failures = []

    def attempt(what: str, part):
        try:
            return part(device, calls)
        except Exception as e:  # noqa: BLE001 -- kept as a row, printed, and the run exits 1 after writing
            failures.append({"op": what, "mode": "failed", "impl": "-", "skipped": f"{type(e).__name__}: {e}"})
            return None

    extras = (
        [r for r in aot if "skipped" in r]
        + (attempt("launch floor", launch_floor_rows) or [])
        + (attempt("driver calls", driver_call_rows) or [])
    )
    profile = attempt("cProfile", profile_layer_norm) or []
    extras += failures
    if extras:  # on a CPU, decode's aot row skipped (the case's fp32 caches ship no decode cubins)
        common.print_table(extras, ["op", "mode", "impl", "host_us", "skipped"])
    if profile:
        print("cProfile, fasttrain layer_norm forward + backward: function, self us per call, calls per call")
        for entry in profile:
            print("  ", *entry)
    path = common.write_results(
        "overhead", device, rows + extras, {"layer_norm_cprofile": profile}, args.out, args.quick
    )
    print(f"wrote {path}")
    if failures:
        raise SystemExit(f"failed, the rest written: {[r['op'] for r in failures]}")


if __name__ == "__main__":
    main()
