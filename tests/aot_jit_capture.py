"""What the Triton JIT launcher and the C++ aot launcher are given for the same norm, rotary, cross-entropy and decode
calls, without a GPU.

Run as a script (tests/test_norms_aot.py starts it): TRITON_INTERPRET=0 before Triton is imported, the active driver
mocked to an sm_90 one, and JITFunction._do_compile replaced by a stand-in that compiles nothing and records what the
JIT specialized (its signature with the constexprs it made of None and 1-valued arguments, its divisibility-16
attributes, num_warps) and then the launch it is given (grid, every argument). kernels/norms.py's launchers run as on
a GPU (one row per program forward; 4 * 132 programs at most backward), kernels/rotary.py's likewise (one token per
program). The C++ ops run on the same tensors with the
launch recorder on, the registry loaded from the shipped cubins in argv[1]. Tensors are named by role, so the two
processes' addresses never need to match: an input by its name, an output by the returned tensor it is, any other
buffer (the dw/db partials) "buffer", an absent one or an empty tensor "null".

    python tests/aot_jit_capture.py AOT_DIR[:AOT_DIR...] CASES_JSON   # prints one JSON object per case

A case with "op": "cross_entropy" runs kernels/cross_entropy.py's launchers and the cross_entropy_*_aot ops
(tests/test_cross_entropy_aot.py starts those); one with "op": "decode" every launch of one kernels/decode.py
`decode` call and of fasttrain::decode_aot (tests/test_decode_aot.py); one with "op": "attention" the launch of one
kernels/attention.py `attention_forward` call (with the global scratch Triton's launcher would ask its allocator for)
and those of fasttrain::attention_forward_aot (tests/test_attention_aot.py); one with "op": "attention_backward"
every launch of one kernels/attention_backward.py `attention_backward` call and of fasttrain::attention_backward_aot
(or, for a packed function's gradients, its _into_aot form; tests/test_attention_backward_aot.py).
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton: the decorators must build JIT functions

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# The sm_90 driver stand-in that tools/triton_launch_python.py times Triton's launch with.
_spec = importlib.util.spec_from_file_location(
    "triton_launch_python", Path(__file__).resolve().parents[1] / "tools" / "triton_launch_python.py"
)
_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tool)
_NoGpu = _tool._NoGpu

MULTIPROCESSORS = 132
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


_jit_launches = []


class _Recorded:
    """A compiled kernel that records its launch instead of making it."""

    def __init__(self, fn, signature, constexprs, options, attrs):
        self.fn, self.signature, self.constexprs, self.options, self.attrs = fn, signature, constexprs, options, attrs
        self.function, self.packed_metadata = 0, None

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, grid_0, grid_1, grid_2, stream, function, metadata, launch_metadata, enter, exit, *args):
        _jit_launches.append((self, (grid_0, grid_1, grid_2), args))


def _do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
    return _Recorded(self, signature, constexprs, options, attrs)


def _names(named: dict) -> dict:
    """address -> role, for the tensors that have one (an empty tensor's address is 0: "null")."""
    return {t.data_ptr(): name for name, t in named.items() if t is not None and t.numel()}


def _role(value, names: dict):
    if value is None:
        return "null"
    if isinstance(value, torch.Tensor):
        value = value.data_ptr()
        return names.get(value, "buffer") if value else "null"
    return value


def jit_launch(names: dict, launch: tuple | None = None) -> dict:
    (kernel, grid, args) = launch or _jit_launches.pop()
    params = [p.name for p in kernel.fn.params]
    # constexprs: {(index,): value}; attrs: {(index,): [["tt.divisibility", 16]]}
    constexprs = {params[i[0]]: (v if not isinstance(v, torch.dtype) else str(v)) for i, v in kernel.constexprs.items()}
    divisible = sorted(params[i[0]] for i, a in kernel.attrs.items() if ["tt.divisibility", 16] in a)
    return {
        "kernel": kernel.fn.__name__,
        "signature": dict(kernel.signature),
        "constexprs": constexprs,
        "divisible": divisible,
        "num_warps": kernel.options.num_warps,
        "grid": list(grid),
        "args": {p: _role(a, names) for p, a in zip(params, args) if kernel.signature[p] != "constexpr"},
    }


def aot_launch(C, entries: dict, names: dict, r: dict | None = None) -> dict:
    if r is None:
        (r,) = C.aot_records()
        C.aot_record(True, MULTIPROCESSORS)  # clears
    entry = entries[(r["kernel"], _TRITON_DTYPE[r["dtype"]], r["case"])]
    arg_names = [n for n, _ in entry["args"]]
    values = {n: (_pointer_role(v, names) if t == "ptr" else v) for n, t, v in zip(arg_names, r["types"], r["args"])}
    return {
        "kernel": r["kernel"],
        "case": r["case"],
        "constexprs": dict(zip(entry["constexprs"], r["constexprs"])),
        "types": dict(entry["args"]),
        "divisible": sorted(entry["divisible_by_16"]),
        "num_warps": r["num_warps"],
        "shared": r["shared"],
        "entry_shared": entry["shared"],
        "grid": list(r["grid"]),
        "args": values,
        "scratch_params": r["scratch_params"],
    }


def _pointer_role(address: int, names: dict) -> str:
    return names.get(address, "buffer") if address else "null"


_TRITON_DTYPE = {"BFloat16": "bf16", "Half": "fp16", "Float": "fp32"}  # the records' dtype names (c10's)


def run_case(C, norms, entries, case: dict) -> dict:
    """case: kind (forward, backward), M, N, dtype, profile (kernels/norms.py _pointer_types: same, autocast,
    branch), is_rms, residual, weight, bias (and dres, backward's residual-stream gradient: residual)."""
    torch.manual_seed(case.get("seed", 0))
    half, profile = DTYPES[case["dtype"]], case["profile"]
    rows = half if profile == "same" else torch.float32  # the stream, weight and bias
    M, N, is_rms = case["M"], case["N"], case["is_rms"]
    x = torch.randn(M, N, dtype=half if profile != "autocast" else torch.float32)
    residual = torch.randn(M, N, dtype=rows) if case["residual"] else None
    weight = torch.randn(N, dtype=rows) if case["weight"] else None
    bias = torch.randn(N, dtype=rows) if case["bias"] else None
    inputs = {"x": x, "residual": residual, "weight": weight, "bias": bias}
    out = {}
    if case["kind"] == "forward":
        jit = norms.norm_forward(x, residual, weight, bias, 1e-5, is_rms, half)
        out["jit"] = jit_launch(_names({**inputs, **dict(zip(("y", "s", "mean", "rstd"), jit))}))
        ours = torch.ops.fasttrain.norm_forward_aot(x, residual, weight, bias, 1e-5, is_rms, half)
        out["aot"] = aot_launch(C, entries, _names({**inputs, **dict(zip(("y", "s", "mean", "rstd"), ours))}))
    else:
        dy = torch.randn(M, N, dtype=half)
        x = x.to(rows)  # backward's x is the rows normalized: the stream
        dres = torch.randn(M, N, dtype=rows) if case["residual"] else None
        dx2_dtype = half if profile == "branch" else None
        mean = torch.randn(0 if is_rms else M)
        rstd = torch.rand(M) + 0.5
        inputs = {"dy": dy, "x": x, "weight": weight, "mean": mean, "rstd": rstd, "dres": dres}
        args = (dy, x, weight, mean, rstd, is_rms, case["bias"], dres, dx2_dtype)
        jit = norms.norm_backward(*args)
        out["jit"] = jit_launch(_names({**inputs, "dx": jit[0], "dx2": jit[1]}))
        ours = torch.ops.fasttrain.norm_backward_aot(*args)
        out["aot"] = aot_launch(C, entries, _names({**inputs, "dx": ours[0], "dx2": ours[1]}))
    return out


def run_rotary_case(C, rotary, entries, case: dict) -> dict:
    """case: kind (rotary, rotary_ in place), B, T, H, D, half, dtype, tables (fp32 or same), mode (shared,
    per-sequence, offsets), offsets_dtype, offset, conjugate, view (x a head slice of a wider qkv tensor)."""
    torch.manual_seed(case.get("seed", 0))
    dtype = DTYPES[case["dtype"]]
    B, T, H, D, half = case["B"], case["T"], case["H"], case["D"], case["half"]
    table_dtype = torch.float32 if case["tables"] == "fp32" else dtype
    if case["view"]:
        x = torch.randn(B, T, 2 * H + 1, D, dtype=dtype)[:, :, 1 : H + 1]  # (B, T, H, D), the model's qkv slice
    else:
        x = torch.randn(B, T, H, D, dtype=dtype)
    rows = (B, T, half) if case["mode"] == "per-sequence" else (T + case["offset"] + 3, half)
    cos, sin = torch.randn(*rows, dtype=table_dtype), torch.randn(*rows, dtype=table_dtype)
    offsets = None
    if case["mode"] == "offsets":
        offsets = torch.randint(0, 3, (B,), dtype=getattr(torch, case["offsets_dtype"]))
    offset, conjugate, inplace = case["offset"], case["conjugate"], case["kind"] == "rotary_"
    inputs = {"x": x, "cos": cos, "sin": sin, "offsets": offsets}
    out = {}
    jit_out = x if inplace else torch.empty(x.shape, dtype=dtype)
    rotary.rotary(x, cos, sin, offsets, offset, False, conjugate, jit_out)
    out["jit"] = jit_launch(_names({**inputs, "out": jit_out}))
    if inplace:
        torch.ops.fasttrain.rotary_aot_(x, cos, sin, offsets, offset, False)
        ours = x
    else:
        ours = torch.ops.fasttrain.rotary_aot(x, cos, sin, offsets, offset, False, conjugate)
    out["aot"] = aot_launch(C, entries, _names({**inputs, "out": ours}))
    return out


def run_cross_entropy_case(C, ce, entries, case: dict) -> dict:
    """case: kind (forward, backward), N, V, dtype, ignore_index, ignored (how many rows' targets are ignore_index)."""
    torch.manual_seed(case.get("seed", 0))
    N, V, ignore_index = case["N"], case["V"], case["ignore_index"]
    logits = torch.randn(N, V, dtype=DTYPES[case["dtype"]])
    target = torch.randint(0, V, (N,))
    target[: case["ignored"]] = ignore_index
    inputs = {"logits": logits, "target": target}
    out = {}
    if case["kind"] == "forward":
        jit = ce.cross_entropy_forward(logits, target, ignore_index)
        out["jit"] = jit_launch(_names({**inputs, "loss": jit[0], "lse": jit[1]}))
        ours = torch.ops.fasttrain.cross_entropy_forward_aot(logits, target, ignore_index)
        out["aot"] = aot_launch(C, entries, _names({**inputs, "loss": ours[0], "lse": ours[1]}))
    else:
        inputs["grad_row"], inputs["lse"] = torch.randn(N), torch.randn(N)
        args = (inputs["grad_row"], logits, target, inputs["lse"], ignore_index)
        out["jit"] = jit_launch(_names({**inputs, "grad": ce.cross_entropy_backward(*args)}))
        ours = torch.ops.fasttrain.cross_entropy_backward_aot(*args)
        out["aot"] = aot_launch(C, entries, _names({**inputs, "grad": ours}))
    return out


def run_decode_case(C, entries, case: dict) -> dict:
    """case (op "decode"): B, Tq, H, Hkv, D, Tmax, lengths (B,), leftpad (B,) or None, t_new (0: nothing appended),
    window (left, right) as fasttrain.ops.attention._window gives them, num_splits (0: the heuristic's), dtype. The
    JIT's autotuner takes the head-dim class's first sm_90 config, the tile the C++ op launches. The launches of one
    call in order (append, decode, combine): the split partials are "buffer" on both sides."""
    from fasttrain.kernels import decode

    torch.manual_seed(case.get("seed", 0))
    half = DTYPES[case["dtype"]]
    B, Tq, H, Hkv, D, Tmax, t_new = (case[k] for k in ("B", "Tq", "H", "Hkv", "D", "Tmax", "t_new"))
    decode._decode.configs = [decode.DECODE_CONFIGS[90][decode.head_dim_class(D)][0]]
    q = torch.randn(B, Tq, H, D, dtype=half)
    k_cache, v_cache = torch.randn(B, Tmax, Hkv, D, dtype=half), torch.randn(B, Tmax, Hkv, D, dtype=half)
    k, v = (torch.randn(B, t_new, Hkv, D, dtype=half) for _ in "kv") if t_new else (None, None)
    seqlens = torch.tensor(case["lengths"], dtype=torch.int32)
    leftpad = None if case["leftpad"] is None else torch.tensor(case["leftpad"], dtype=torch.int32)
    inputs = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v, "cache_seqlens": seqlens}
    inputs["cache_leftpad"] = leftpad
    scale, (left, right), splits = D**-0.5, case["window"], case["num_splits"]
    del _jit_launches[:]
    out, lse = decode.decode(
        q, k_cache, v_cache, k, v, None, None, seqlens, None, leftpad, None, scale, left, right, False, False, splits
    )
    names = _names({**inputs, "out": out, "lse": lse})
    jit = [jit_launch(names, launch) for launch in _jit_launches]
    out, lse = torch.ops.fasttrain.decode_aot(q, k_cache, v_cache, k, v, seqlens, leftpad, scale, left, right, splits)
    names = _names({**inputs, "out": out, "lse": lse})
    aot = [aot_launch(C, entries, names, r) for r in C.aot_records()]
    C.aot_record(True, MULTIPROCESSORS)  # clears
    return {"jit": jit, "aot": aot}


def jit_scratch_request(index: list, jit: dict) -> list:
    """What Triton's launcher (its CUDA driver's, run with a stand-in launch) asks triton.set_allocator's allocator
    for when it launches the compiled case of a JIT launch (the index entry of the same kernel and constexprs, whose
    metadata it reads): [(bytes, alignment)] per scratch it allocates."""
    from triton.backends.nvidia.driver import CudaLauncher
    from triton.runtime import _allocation

    (entry,) = [
        e
        for e in index
        if e["kernel"] == jit["kernel"]
        and "*" + e["dtype"] == jit["signature"]["Q"]
        # a pipelined tile ignores FULL_TILES: its False cubin serves both (kernels/attention*.py _shipped)
        and all(
            int(jit["constexprs"][k]) == int(v)
            for k, v in e["constexprs"].items()
            if k != "FULL_TILES" or e["constexprs"].get("WARP_SPECIALIZE", True)
        )
        and e["num_warps"] == jit["num_warps"]
    ]
    launcher = CudaLauncher.__new__(CudaLauncher)
    launcher.num_ctas = entry["num_ctas"] or 1
    launcher.global_scratch_size = entry["global_scratch_size"] or 0
    launcher.global_scratch_align = entry["global_scratch_align"] or 1
    launcher.profile_scratch_size = entry["profile_scratch_size"] or 0
    launcher.profile_scratch_align = entry["profile_scratch_align"] or 1
    launcher.launch_cooperative_grid = launcher.launch_pdl = False
    launcher.arg_annotations = launcher.kernel_signature = None
    launcher.launch = lambda *args: None
    requests = []
    previous = _allocation._allocator.get()
    triton.set_allocator(lambda size, align, stream: requests.append([size, align]))
    try:
        launcher(*jit["grid"], 0, 0, None, None, None, None)
    finally:
        triton.set_allocator(previous)
    return requests


def _attention_inputs(case: dict, half, *names) -> tuple[dict, dict, tuple]:
    """The case's tensors by name (q, k, v and the rest of `names` shaped like q) and offsets (cu_q, cu_k: empty for a
    dense case), and the (cu_q, cu_k, Tq, Tk) a launcher takes. A case with lengths_q and lengths_k (one per sequence)
    is packed: (total, H, D) tensors, int32 offsets, Tq and Tk the longest sequences; else (B, Tq, H, D)."""
    H, Hkv, D = case["H"], case["Hkv"], case["D"]
    if "lengths_q" in case:
        rows_q, rows_k = (sum(case["lengths_q"]),), (sum(case["lengths_k"]),)
        cu = {
            f"cu_{x}": torch.tensor([0, *torch.tensor(case[f"lengths_{x}"]).cumsum(0).tolist()], dtype=torch.int32)
            for x in "qk"
        }
        packed = (cu["cu_q"], cu["cu_k"], max(case["lengths_q"]), max(case["lengths_k"]))
    else:
        rows_q, rows_k = (case["B"], case["Tq"]), (case["B"], case["Tk"])
        cu, packed = {}, (None, None, case["Tq"], case["Tk"])
    tensors = {n: torch.randn(*rows_q, H, D, dtype=half) for n in ("q", *names)}
    tensors.update(k=torch.randn(*rows_k, Hkv, D, dtype=half), v=torch.randn(*rows_k, Hkv, D, dtype=half))
    return tensors, cu, packed


def _dropout(case: dict, tensors: dict) -> tuple:
    """(dropout_p, seed) of a case, the seed drawn as fasttrain.ops.attention draws it and named "seed" in tensors."""
    from fasttrain.ops.attention_dropout import dropout_seed

    p = case.get("dropout_p", 0.0)
    if p == 0.0:
        return 0.0, None
    tensors["seed"] = seed = dropout_seed(tensors["q"].device)
    return p, seed


def run_attention_case(C, entries, index, case: dict) -> dict:
    """case (op "attention"): B, Tq, Tk (or lengths_q and lengths_k: packed), H, Hkv, D, window (left, right) as
    fasttrain.ops.attention._window gives them, dtype, config (the index of the sm_90 config of the head-dim class
    that the JIT's autotuner is held to and that the C++ tuner is given the fastest time for), times (the C++ tuner's
    times, one per shipped candidate), dropout_p (optional; the seed tensor, "seed", drawn as the public functions
    draw it). The JIT's launch and the C++ op's launches (the tuner's trials, then the chosen one), with the JIT's
    scratch request."""
    from fasttrain.kernels import attention
    from fasttrain.kernels._attention_configs import FWD_CONFIGS, head_dim_class

    torch.manual_seed(case.get("seed", 0))
    half, D = DTYPES[case["dtype"]], case["D"]
    attention._attn_fwd.configs = [FWD_CONFIGS[90][head_dim_class(D)][case["config"]]]
    tensors, cu, (cu_q, cu_k, Tq, Tk) = _attention_inputs(case, half)
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    scale, (left, right) = D**-0.5, case["window"]
    p, seed = _dropout(case, tensors)
    del _jit_launches[:]
    out, lse = attention.attention_forward(q, k, v, cu_q, cu_k, Tq, Tk, scale, left, right, p, seed)
    (launch,) = _jit_launches
    jit = jit_launch(_names({**tensors, **cu, "out": out, "lse": lse}), launch)
    jit["scratch"] = jit_scratch_request(index, jit)
    C.aot_tune_reset(case["times"])
    if cu_q is None:
        out, lse = torch.ops.fasttrain.attention_forward_aot(q, k, v, scale, left, right, p, seed)
    else:
        args = (cu_q, cu_k, Tq, Tk, scale, left, right, p, seed)
        out, lse = torch.ops.fasttrain.attention_varlen_forward_aot(q, k, v, *args)
    names = _names({**tensors, **cu, "out": out, "lse": lse})
    aot = [{**aot_launch(C, entries, names, r), "scratch_bytes": r["scratch_bytes"]} for r in C.aot_records()]
    C.aot_record(True, MULTIPROCESSORS)  # clears
    C.aot_tune_reset()
    return {"jit": jit, "aot": aot}


def _stacked(tensors: tuple) -> tuple:
    """Views of one packed tensor (..., n, H, D) holding the given tensors' values, as unbind(-3) gives them."""
    return torch.stack(tensors, dim=-3).unbind(-3)


def _packed_gradients(q, k, v, packed: str) -> tuple:
    """(dq, dk, dv) as the packed functions' backward makes them: views of one fresh (..., 3, H, D) gradient ("qkv"),
    or dq and views of a fresh (..., 2, Hkv, D) one ("kv")."""
    if packed == "qkv":
        return torch.empty(*q.shape[:-2], 3, *q.shape[-2:], dtype=q.dtype).unbind(-3)
    return torch.empty_like(q), *torch.empty(*k.shape[:-2], 2, *k.shape[-2:], dtype=k.dtype).unbind(-3)


def run_attention_backward_case(C, entries, case: dict) -> dict:
    """case (op "attention_backward"): B, Tq, Tk (or lengths_q and lengths_k: packed), H, Hkv, D, window (left, right)
    as fasttrain.ops.attention._window gives them, deterministic, dtype, plan (the JIT's plan: "atomic dQ" or "dQ
    kernel"; the C++ op, with nothing to time, takes the atomic one unless deterministic). The JIT's autotuners take the
    head-dim class's first shipped sm_90 tile (a head dim of ONE_TILE: its one), the one the C++ op launches untimed, or
    the dK/dV tile dkdv_tile (an index into the shipped tiles) when the case gives the C++ tuner its times
    (fasttrain._C.aot_tune_reset), which then records its trials too; with dropout_p (optional) the tiles shipped for
    dropout, and the seed tensor, "seed". The launches of one call in order (preprocess, dK/dV, dQ). A case with
    "packed" ("qkv" or "kv") is a packed function's: q, k and v views of one (..., 3, H, D) tensor (or k and v of one
    (..., 2, Hkv, D)), the gradients written into views of a packed one (the JIT's `into`, the _into_aot ops). With
    "dlse" true, lse has a gradient ("dlse", random)."""
    from fasttrain.kernels import attention_backward as ab
    from fasttrain.kernels._attention_configs import (
        DKDV_CONFIGS,
        DKDV_DQ_CONFIGS,
        DQ_CONFIGS,
        head_dim_class,
        one_tile,
    )

    torch.manual_seed(case.get("seed", 0))
    half, H, D = DTYPES[case["dtype"]], case["H"], case["D"]
    cls = head_dim_class(D)
    tile, dropout = case.get("dkdv_tile", 0), case.get("dropout_p", 0.0) > 0.0
    tables = (("dkdv", ab._attn_bwd_dkdv, DKDV_CONFIGS), ("dkdv_dq", ab._attn_bwd_dkdv_dq, DKDV_DQ_CONFIGS))
    for name, tuner, table in tables:  # a head dim of ONE_TILE: its one shipped tile
        tuner.configs = one_tile(D, 90, name, ab.shipped_tiles(table[90], cls, dropout))[tile : tile + 1]
        tuner.early_config_prune = None
    ab._attn_bwd_dq.configs = one_tile(D, 90, "dq", ab.shipped_tiles(DQ_CONFIGS[90], cls, dropout))[:1]
    ab._attn_bwd_dq.early_config_prune = None
    ab._backward_plans.default = case["plan"]
    inputs, cu, (cu_q, cu_k, Tq, Tk) = _attention_inputs(case, half, "out", "dout")
    packed = case.get("packed")
    if packed == "qkv":
        inputs["q"], inputs["k"], inputs["v"] = _stacked((inputs["q"], inputs["k"], inputs["v"]))
    elif packed == "kv":
        inputs["k"], inputs["v"] = _stacked((inputs["k"], inputs["v"]))
    q, k, v, out, do = (inputs[n] for n in ("q", "k", "v", "out", "dout"))
    inputs["lse"] = lse = torch.randn(H, q.shape[0]) if cu else torch.randn(q.shape[0], H, Tq)
    inputs.update(cu)
    scale, (left, right), det = D**-0.5, case["window"], case["deterministic"]
    p, seed = _dropout(case, inputs)
    dlse = inputs["dlse"] = torch.randn(lse.shape) if case.get("dlse") else None
    del _jit_launches[:]
    args = (do, q, k, v, out, lse, dlse, cu_q, cu_k, Tq, Tk, scale, left, right, det)
    into = _packed_gradients(q, k, v, packed) if packed else None
    dq, dk, dv = ab.attention_backward(*args, into=into, dropout_p=p, seed=seed)
    names = _names({**inputs, "dq": dq, "dk": dk, "dv": dv})
    jit = [jit_launch(names, launch) for launch in _jit_launches]
    C.aot_tune_reset(case.get("times", []))
    tail = (det, p, seed, dlse)
    if packed:
        dq, dk, dv = _packed_gradients(q, k, v, packed)
        if cu_q is None:
            args = (dq, dk, dv, do, q, k, v, out, lse, scale, left, right, *tail)
            torch.ops.fasttrain.attention_backward_into_aot(*args)
        else:
            args = (do, q, k, v, out, lse, cu_q, cu_k, Tq, Tk, scale, left, right, *tail)
            torch.ops.fasttrain.attention_varlen_backward_into_aot(dq, dk, dv, *args)
    elif cu_q is None:
        args = (do, q, k, v, out, lse, scale, left, right, *tail)
        dq, dk, dv = torch.ops.fasttrain.attention_backward_aot(*args)
    else:
        args = (do, q, k, v, out, lse, cu_q, cu_k, Tq, Tk, scale, left, right, *tail)
        dq, dk, dv = torch.ops.fasttrain.attention_varlen_backward_aot(*args)
    names = _names({**inputs, "dq": dq, "dk": dk, "dv": dv})
    aot = [aot_launch(C, entries, names, r) for r in C.aot_records()]
    C.aot_record(True, MULTIPROCESSORS)  # clears
    return {"jit": jit, "aot": aot}


def main() -> None:
    aot_dir, cases = sys.argv[1], json.loads(sys.argv[2])
    driver.set_active(_NoGpu())
    JITFunction._do_compile = _do_compile
    import fasttrain._C as C
    from fasttrain import _aot
    from fasttrain.kernels import cross_entropy, norms, rotary

    norms.rows_per_block = lambda x, block_n: 1  # a GPU's tiles: one row per program
    rotary.tokens_per_block = lambda x, block_h, block_r: 1  # one token per program
    norms._programs = lambda device, n_rows: max(1, min(n_rows, 4 * MULTIPROCESSORS))
    from fasttrain.kernels import decode

    decode._parallel_units = lambda device: MULTIPROCESSORS  # the split heuristic's SM count, as on the GPU
    decode._arch_configs = lambda: decode.DECODE_CONFIGS[90]  # the pruner's configs: sm_90's
    C.aot_clear()
    entries, indexed = {}, []
    for directory in aot_dir.split(os.pathsep):  # one or more tools/aot.py --out folders
        _aot.load(directory, arch=90)
        index = json.loads(Path(directory, "index.json").read_text())
        entries.update({(e["kernel"], e["dtype"], e["case"]): e for e in index})
        indexed += index
    C.aot_record(True, MULTIPROCESSORS)
    try:
        for case in cases:
            if case.get("op") == "cross_entropy":
                result = run_cross_entropy_case(C, cross_entropy, entries, case)
            elif case.get("op") == "decode":
                result = run_decode_case(C, entries, case)
            elif case.get("op") == "attention":
                result = run_attention_case(C, entries, indexed, case)
            elif case.get("op") == "attention_backward":
                result = run_attention_backward_case(C, entries, case)
            elif case["kind"].startswith("rotary"):
                result = run_rotary_case(C, rotary, entries, case)
            else:
                result = run_case(C, norms, entries, case)
            print(json.dumps({"case": case, **result}), flush=True)
    finally:
        C.aot_record(False, 0)
    assert triton.__version__  # the JIT whose launches these are: the test reports its version
    print(json.dumps({"triton": triton.__version__}))


if __name__ == "__main__":
    main()
