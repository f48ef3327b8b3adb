"""What the op tests share: the tolerance table, random inputs, error measures and the 2x-PyTorch rule.

How a kernel is judged: against a float64 computation of the same function, inputs and gradients alike.
- fp32 (the Triton interpreter and the C++ kernels on a CPU): its error stays under TOL_FP32[op], a bound a few times
  above the worst error measured over that op's test grid, which only summation order separates from float64.
- fp16/bf16 (the GPU tests): its error is at most twice that of PyTorch's own op in the same dtype, both against
  float64 (flash-attn's rule): `assert_within_2x_torch`.
"""

from __future__ import annotations

import numpy as np
import torch

TOL_FP32 = {
    # absolute, on unit-variance q, k, v: measured worst 3e-6 over test_attention's cases
    "attention": 5e-5,
    # relative (err) for a summed loss: the online logsumexp reorders sums; measured worst 3.2e-7
    "cross_entropy": 2e-5,
    # relative (err), the loss and the gradients of x, weight and bias: measured worst 2.1e-6 over the test grid
    "linear_cross_entropy": 1e-5,
    # absolute and relative (torch.testing.assert_close): measured max |error| ~5e-7 on test_decode's shapes
    "decode": 1e-5,
    # relative (err) on unit-normal rows: a reordered fp32 row sum; measured worst 1.8e-6 (N 1000)
    "norms": 1e-5,
    # relative (err): one product pair per element; measured worst 4.8e-7 on unit-normal inputs
    "rotary": 2e-6,
    # relative (err): one activation and one product per element; measured worst 4.7e-7 on 3x-unit-normal gates
    "swiglu": 2e-6,
}
# fp16/bf16 under the interpreter, which computes the attention tiles in fp32 after loading: the error is the final
# rounding of out and the gradients.
TOL_HALF = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b|, relative to the reference b's largest magnitude where that exceeds 1 (a summed loss)."""
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b|."""
    return (a.double() - b.double()).abs().max().item()


def randn(*shape, dtype=torch.float32, device="cpu", seed: int = 0, scale: float = 1.0, grad: bool = True):
    """A fresh normal tensor of `scale`, drawn in fp32 from its own seeded generator and cast to dtype (so that
    every dtype sees the same values, rounded), a leaf requiring grad unless grad=False."""
    g = torch.Generator(device=device).manual_seed(seed)
    t = (scale * torch.randn(*shape, generator=g, device=device)).to(dtype)
    return t.requires_grad_() if grad else t


def grads(outputs, inputs, upstream) -> list:
    """d outputs / d inputs against `upstream`, with None for an input that is None."""
    live = [t for t in inputs if t is not None]
    found = iter(torch.autograd.grad(outputs, live, upstream))
    return [next(found) if t is not None else None for t in inputs]


def float64_leaves(*tensors) -> list:
    """Each tensor as a float64 leaf requiring grad (None stays None): the inputs of the float64 computation."""
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def assert_within_2x_torch(ours, torch_same_dtype, want, measure=err, slack: float = 1e-6, what: str = "") -> None:
    """The house rule for low precision: ours is at most twice as far from float64 `want` as PyTorch's own op in the
    same dtype, plus `slack` for the rounding of an exactly computed value."""
    ours_err, torch_err = measure(ours, want), measure(torch_same_dtype, want)
    assert ours_err <= 2 * torch_err + slack, f"{what} error {ours_err:.3g}, torch's {torch_err:.3g}"


def set_attn_implementation(model, impl: str) -> None:
    """model.set_attn_implementation(impl): the attention layers and the mask builder read it at every forward."""
    model.set_attn_implementation(impl)


def assert_aot_launch_is_the_jit_launch(jit: dict, aot: dict) -> None:
    """A launch of the C++ aot launcher (recorded) is the one Triton's JIT launcher is given for the same call
    (tests/aot_jit_capture.py captures both): kernel, grid, warps, the compiled case's constexprs as the JIT took
    them, every argument in order with its type and value."""
    assert jit["kernel"] == aot["kernel"]
    assert jit["grid"] == aot["grid"] and jit["num_warps"] == aot["num_warps"]
    assert aot["shared"] == aot["entry_shared"] and aot["scratch_params"] == 2
    # The compiled case: the kernel's constexprs as the JIT took them.
    assert aot["constexprs"] == {k: int(jit["constexprs"][k]) for k in aot["constexprs"]}
    assert list(aot["args"]) == [
        n for n, t in jit["signature"].items() if t != "constexpr" or n not in aot["constexprs"]
    ]
    for name, value in aot["args"].items():
        if jit["signature"][name] == "constexpr":
            # The JIT made a constexpr of a None pointer (dropped from its launch: the cubin gets a null it never
            # reads) or of a 1-valued integer (the cubin gets the 1 as an ordinary argument).
            assert (value, jit["constexprs"][name]) in (("null", None), (1, 1)), name
            continue
        assert jit["signature"][name] == aot["types"][name], name
        if aot["types"][name] == "fp32":
            assert value == float(np.float32(jit["args"][name])), name
        else:
            assert value == jit["args"][name], name
    # The cubin assumes 16-divisibility only of what the JIT found divisible (or a null it never reads).
    assert all(n in jit["divisible"] or aot["args"][n] == "null" for n in aot["divisible"])


def aot_jit_launches(aot_dir, cases: list[dict]) -> list[dict]:
    """Per case, {"case", "jit", "aot"}: the JIT launcher's launch and the recorded C++ launch of one call, from
    tests/aot_jit_capture.py in one child (it imports Triton with the interpreter off and mocks the driver)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "aot_jit_capture.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(aot_dir), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    return [line for line in lines if "case" in line]
