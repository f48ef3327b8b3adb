"""Every Triton kernel and autotune config compiles ahead of time for sm_90 and sm_80, without a GPU.

The interpreter forgives what the compiler rejects (a non-constexpr global, a bad layout, too much shared memory),
so this compiles each entry of fasttrain.kernels._aot.TABLE per arch in a subprocess with TRITON_INTERPRET=0, one
subprocess per arch, side by side. Fails on a compile error, on shared memory over the arch's per-block limit, and on
register spills (cuobjdump STACK or LOCAL > 0) in the configs tuned for sm_90.
"""

import json
import os
import subprocess
import sys

import pytest

from fasttrain.kernels import _aot


@pytest.fixture(scope="module")
def compiled():
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the @triton.jit decorators must build compilable kernels
    procs = {
        arch: subprocess.Popen(
            [sys.executable, "-m", "fasttrain.kernels._aot", "--arch", str(arch)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for arch in _aot.SHARED_LIMIT
    }
    rows = []
    for arch, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"sm_{arch} AOT run failed:\n{stderr[-4000:]}"
        rows += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return rows


@pytest.mark.parametrize("arch", sorted(_aot.SHARED_LIMIT))
def test_every_kernel_and_config_compiles(compiled, arch):
    rows = [r for r in compiled if r["arch"] == arch]
    assert {r["kernel"] for r in rows} == {e.kernel for e in _aot.TABLE}
    errors = [f"{r['kernel']} [{r['case']}]: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    over = [
        f"{r['kernel']} [{r['case']}]: {r['shared'] + r['shared_dynamic']} B"
        for r in rows
        if r["shared"] + r["shared_dynamic"] > _aot.SHARED_LIMIT[arch]
    ]
    assert not over, f"shared memory over the sm_{arch} limit {_aot.SHARED_LIMIT[arch]} B:\n" + "\n".join(over)


def test_sm90_configs_do_not_spill_and_use_wgmma(compiled):
    rows = [r for r in compiled if r["arch"] == 90 and "error" not in r]
    spills = [
        f"{r['kernel']} [{r['case']}]: stack {r['stack']} B, local {r['local']} B, {r['reg']} regs"
        for r in rows
        if r["stack"] or r["local"]
    ]
    assert not spills, "register spills in sm_90 configs:\n" + "\n".join(spills)
    # d64/d128, the tuned sizes (docs/backends.md): each kernel's list for each holds a config whose tl.dot lowered to
    # wgmma (a list may also hold an mma.sync fallback; the autotuner measures). The d256 tiles are 32 rows, below a
    # warpgroup MMA's 64. Decode kernels are memory-bound with 16-row tiles (mma.sync); cross-entropy has no matmul.
    # dK/dV's two tables (dQ by atomics or not) count apart.
    tuned = {}
    for r in rows:
        if r["kernel"] in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel") and not r[
            "case"
        ].startswith("d256"):
            kernel = r["kernel"] + (" ATOMIC_DQ" if "ATOMIC_DQ=True" in r["case"] else "")
            tuned.setdefault((kernel, r["case"].split()[0]), []).append(r["wgmma"])
    no_wgmma = [f"{kernel} [{cls}]" for (kernel, cls), wgmma in tuned.items() if not any(wgmma)]
    assert len(tuned) == 8 and not no_wgmma, "tl.dot did not lower to wgmma:\n" + "\n".join(no_wgmma)
    # The atomic dK/dV's dQ product on 32-row tiles is computed transposed so that it, too, runs on wgmma.
    atomic = [r for r in rows if "ATOMIC_DQ=True" in r["case"] and not r["case"].startswith("d256")]
    assert atomic and all(r["mma_sync"] == 0 for r in atomic), [(r["case"], r["mma_sync"]) for r in atomic]


@pytest.mark.parametrize("kernel", ["_attn_fwd_kernel", "_attn_bwd_dkdv_kernel"])
def test_sm90_warp_specialized_configs_specialize(compiled, kernel):
    """A WARP_SPECIALIZE=True config that compiled without specializing (a Triton whose Hopper pass skipped the loop)
    would run as a slower software-pipelined kernel: each, masked or not (" full"), must read by TMA and run a loading
    warpgroup beside its two computing ones (12 warps for num_warps=4, setmaxnreg); the others keep their warps."""
    rows = [r for r in compiled if r["arch"] == 90 and r["kernel"] == kernel and "error" not in r]
    ws = [r for r in rows if "WARP_SPECIALIZE=True" in r["case"]]
    assert {r["case"].split()[0] for r in ws} == {"d64", "d128"}
    assert {r["case"].endswith(" full") for r in ws} == {True, False}
    for r in ws:
        assert r["tma"] and r["setmaxnreg"] and r["wgmma"], r
        assert r["launched_warps"] == 3 * int(r["case"].split(" w")[1].split()[0]), r
    for r in rows:
        if r not in ws:
            assert not r["setmaxnreg"] and r["launched_warps"] == int(r["case"].split(" w")[1].split()[0]), r


_BENCH_KERNEL_CHILD = """
import importlib.util, pathlib, sys
path = pathlib.Path(sys.argv[1]) / (sys.argv[2] + ".py")
sys.path.insert(0, str(path.parent))
spec = importlib.util.spec_from_file_location(sys.argv[2], path)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
from fasttrain.kernels._aot import compile_one
kernel = getattr(bench, sys.argv[3])
# pointers are capitalized (fp32 tensors), the other runtime arguments ints, BLOCK the one constexpr
signature = {name: "*fp32" if name[0].isupper() else "i32" for name in kernel.arg_names if name != "BLOCK"}
print(compile_one(kernel, {**signature, "BLOCK": "constexpr"}, {"BLOCK": 1024}, 90, 4, 1)["reg"])
"""


@pytest.mark.parametrize(
    "bench,kernel", [("bench_overhead", "_empty_kernel"), ("bench_adamw", "_seven_streams_kernel")]
)
def test_the_benchmarks_own_kernels_compile_for_sm90(bench, kernel):
    """Kernels the benchmarks launch on a card and the interpreter cannot vouch for: on an H200 (triton 3.6.0)
    bench_overhead's launch floor, its kernel then defined inside a function, failed to compile (the JIT reads the
    annotation `tl.constexpr` among the module's globals), and the run lost every row it had timed."""
    bench_dir = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
    child = subprocess.run(
        [sys.executable, "-c", _BENCH_KERNEL_CHILD, bench_dir, bench, kernel],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "0"},
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert int(child.stdout.split()[-1]) > 0  # registers used: a cubin was built


def test_triton_launch_python_tool_times_a_launch_without_a_gpu():
    """tools/triton_launch_python.py, the measurement behind NOTES.md's split of a launch's host time."""
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "triton_launch_python.py")
    child = subprocess.run(
        [sys.executable, tool, "--calls", "50"],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "0"},
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert float(child.stdout.split(" us per launch")[0].split()[-1]) > 0
