"""Compile Triton kernels ahead of time for sm_90 and sm_80 on a machine without a GPU, and read their resources.

The interpreter forgives what the compiler rejects (docs/platform.md), so tests/test_kernels_compile.py runs this module
in a subprocess with TRITON_INTERPRET=0 (the @triton.jit decorators must see it off) and checks every row.
TABLE holds one entry per kernel; a kernel file joins with one AotKernel line per kernel and an
`aot_signature(kernel, dtype, head_dim) -> (signature, constexprs)` function (signature_from_params builds one).

    python -m fasttrain.kernels._aot --arch 90        # one JSON object per compiled (kernel, class, config)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory per block (opt-in maximum) on H100 / A100
DTYPE = {90: "bf16", 80: "fp16"}  # one half type per arch keeps CI short; both share the code paths


@dataclasses.dataclass(frozen=True)
class AotKernel:
    module: str  # file under kernels/, e.g. "attention"
    kernel: str  # the @triton.jit function
    configs: str | None  # the module's {arch: {head-dim class: [triton.Config]}} table; None: a fixed launch
    per_head_dim: bool = True  # False: one compile per arch (the kernel has no head dim), or one per `sizes`
    sizes: str | None = None  # the module's tuple of row widths (BLOCK_N) to compile for, when there is no head dim


TABLE = [
    AotKernel("attention", "_attn_fwd_kernel", "FWD_CONFIGS"),
    AotKernel("attention_backward", "_attn_bwd_preprocess_kernel", None),
    AotKernel("attention_backward", "_attn_bwd_dkdv_kernel", "DKDV_CONFIGS"),
    AotKernel("attention_backward", "_attn_bwd_dkdv_kernel", "DKDV_DQ_CONFIGS"),  # ATOMIC_DQ=True: dQ by atomics
    AotKernel("attention_backward", "_attn_bwd_dq_kernel", "DQ_CONFIGS"),
    AotKernel("decode", "_decode_append_kernel", None),
    AotKernel("decode", "_decode_kernel", "DECODE_CONFIGS"),
    AotKernel("decode", "_decode_combine_kernel", None),
    AotKernel("cross_entropy", "_ce_forward_kernel", None, per_head_dim=False),
    AotKernel("cross_entropy", "_ce_backward_kernel", None, per_head_dim=False),
    AotKernel("rotary", "_rotary_kernel", None),
    AotKernel("norms", "_norm_forward_kernel", None, per_head_dim=False, sizes="AOT_SIZES"),
    AotKernel("norms", "_norm_backward_kernel", None, per_head_dim=False, sizes="AOT_SIZES"),
]


def signature_from_params(kernel, arg_type, fixed: dict) -> tuple[dict, dict]:
    """(signature, constexprs) for ASTSource from a kernel's parameters: each constexpr takes its value from `fixed`
    when there (the rest come from the config), every other parameter its type from arg_type(name)."""
    signature, constexprs = {}, {}
    for p in kernel.params:
        signature[p.name] = "constexpr" if p.is_constexpr else arg_type(p.name)
        if p.is_constexpr and p.name in fixed:
            constexprs[p.name] = fixed[p.name]
    return signature, constexprs


def divisible(kernel) -> tuple[str, ...]:
    """Arguments a real launch passes as multiples of 16, so that the JIT specializes them: every pointer (torch
    allocations and head-aligned views; pointer parameters are capitalized) and the strides of (.., D)-rows with D a
    multiple of 16. The logsumexp strides (stride_l*) are left out: with Tq = 1 or an odd head count they are not."""
    return tuple(
        p.name
        for p in kernel.params
        if not p.is_constexpr
        and (p.name[0].isupper() or (p.name.startswith("stride_") and not p.name.startswith("stride_l")))
    )


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resources(cubin: bytes) -> dict:
    """REG, STACK, LOCAL and SHARED (static) of the one function in a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(_cuobjdump()), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    return {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text)}


def compile_one(
    kernel, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int, hints: tuple = ()
) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    # `hints` names the arguments that the JIT would specialize as multiples of 16 at a real launch (aligned
    # pointers, strides of whole heads): without the hint, loads compile unvectorized and spill (decode d128: 255
    # registers and 144 B of stack without, 96 registers with).
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in hints}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton_compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    used = resources(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    used["shared_dynamic"] = compiled.metadata.shared
    used["wgmma"] = "wgmma" in ptx
    used["mma_sync"] = ptx.count("mma.sync")  # the pre-Hopper MMA: a product whose M is under wgmma's 64
    used["tma"] = "cp.async.bulk.tensor" in ptx
    # Warp specialization: warpgroups with their own register budgets (setmaxnreg), more warps than configured.
    used["setmaxnreg"] = "setmaxnreg" in ptx
    used["launched_warps"] = compiled.metadata.num_warps
    return used


def cases(entry: AotKernel, arch: int):
    """(label, kernel, signature, constexprs, num_warps, num_stages, hints) for every config of one kernel on one
    arch; the warps of a fixed launch from the module's optional `aot_num_warps(kernel, constexprs)` (else 4)."""
    module = importlib.import_module(f"{__package__}.{entry.module}")
    kernel = getattr(module, entry.kernel)
    hints = divisible(kernel)
    dims = {"d64": 64, "d128": 128, "d256": 256}
    if entry.sizes is not None:
        dims = {f"n{n}": n for n in getattr(module, entry.sizes)}
    elif not entry.per_head_dim:
        dims = {"any": 0}
    if entry.configs is None:
        for cls, d in dims.items():
            signature, constexprs = module.aot_signature(kernel, DTYPE[arch], d)
            warps = module.aot_num_warps(kernel, constexprs) if hasattr(module, "aot_num_warps") else 4
            yield f"{cls} w{warps}", kernel, signature, constexprs, warps, 3, hints
        return
    for cls, configs in getattr(module, entry.configs)[arch].items():
        for config in configs:
            signature, constexprs = module.aot_signature(kernel, DTYPE[arch], dims[cls])
            label = f"{cls} " + " ".join(f"{k}={v}" for k, v in config.kwargs.items())
            label += f" w{config.num_warps} s{config.num_stages}"
            # A module's optional aot_variants(kernel, config kwargs) -> {label suffix: constexprs}: launch-time
            # constexprs that change a config's code (the attention forward's unmasked warp-specialized loop).
            variants = module.aot_variants(kernel, config.kwargs) if hasattr(module, "aot_variants") else {"": {}}
            for suffix, extra in variants.items():
                yield (
                    label + suffix,
                    kernel,
                    signature,
                    {**constexprs, **config.kwargs, **extra},
                    config.num_warps,
                    config.num_stages,
                    hints,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, choices=sorted(SHARED_LIMIT), required=True)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    for entry in TABLE:
        for label, kernel, signature, constexprs, warps, stages, hints in cases(entry, args.arch):
            row = {"kernel": entry.kernel, "arch": args.arch, "case": label}
            try:
                row.update(compile_one(kernel, signature, constexprs, args.arch, warps, stages, hints))
            except Exception as e:  # reported per case, so one bad config does not hide the others
                row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
