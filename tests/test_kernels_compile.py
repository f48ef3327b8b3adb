"""Every Triton kernel and autotune config compiles ahead of time for sm_90 and sm_80, without a GPU.

The interpreter forgives what the compiler rejects (a non-constexpr global, a bad layout, too much shared memory), so
this runs tools/aot.py over every case the kernels describe (each module's aot_kernels) for both archs, in one
subprocess with TRITON_INTERPRET=0 and a worker per core, as a build step would: kernels from the checkout's kernels/,
cubins and their metadata written out. Fails on a compile error, on shared memory over the arch's per-block limit, on
register spills (cuobjdump STACK or LOCAL > 0) in the configs tuned for sm_90, and on metadata that does not match
the kernel. The cubins land in Triton's cache too, so a rerun with unchanged kernels takes seconds.
"""

import importlib.util
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
_spec = importlib.util.spec_from_file_location("aot", TOOLS / "aot.py")
aot = sys.modules["aot"] = importlib.util.module_from_spec(_spec)  # registered first: its dataclass looks it up
_spec.loader.exec_module(aot)
aot.use_kernels_dir(ROOT / "kernels")  # the kernels that the subprocess compiles, for jit_kernels() below


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("aot")


@pytest.fixture(scope="module")
def compiled(out_dir):
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the @triton.jit decorators must build compilable kernels
    archs = [str(a) for a in sorted(aot.SHARED_LIMIT, reverse=True)]
    command = [sys.executable, str(TOOLS / "aot.py"), "--arch", *archs, "--jobs", str(os.cpu_count() or 1)]
    command += ["--kernels-dir", str(ROOT / "kernels"), "--out", str(out_dir)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    # exit status 1 with a row per failed case: test_every_kernel_and_config_compiles names them
    assert rows and proc.returncode in (0, 1), f"tools/aot.py failed:\n{proc.stderr[-4000:]}"
    return rows


def jit_kernels() -> set[str]:
    """Every @triton.jit kernel (a name ending in _kernel) of the public kernel modules, described or not."""
    names = set()
    for module in pkgutil.iter_modules([str(ROOT / "kernels")]):
        if not module.name.startswith("_"):
            # JITFunction, or the interpreter's stand-in for it here (tests run under TRITON_INTERPRET=1)
            found = vars(aot.kernel_module(module.name)).items()
            names |= {n for n, v in found if n.endswith("_kernel") and hasattr(v, "arg_names")}
    return names


@pytest.mark.parametrize("arch", sorted(aot.SHARED_LIMIT))
def test_every_kernel_and_config_compiles(compiled, arch):
    rows = [r for r in compiled if r["arch"] == arch]
    assert {r["kernel"] for r in rows} == jit_kernels()  # a kernel without a compile description fails here
    errors = [f"{r['kernel']} [{r['case']}]: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    over = [
        f"{r['kernel']} [{r['case']}]: {r['shared'] + r['shared_dynamic']} B"
        for r in rows
        if r["shared"] + r["shared_dynamic"] > aot.SHARED_LIMIT[arch]
    ]
    assert not over, f"shared memory over the sm_{arch} limit {aot.SHARED_LIMIT[arch]} B:\n" + "\n".join(over)


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
        head_dim = r["constexprs"].get("HEAD_DIM")
        if r["kernel"] in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel") and head_dim != 256:
            kernel = r["kernel"] + (" ATOMIC_DQ" if r["constexprs"].get("ATOMIC_DQ") else "")
            tuned.setdefault((kernel, head_dim), []).append(r["wgmma"])
    no_wgmma = [f"{kernel} [d{d}]" for (kernel, d), wgmma in tuned.items() if not any(wgmma)]
    assert len(tuned) == 8 and not no_wgmma, "tl.dot did not lower to wgmma:\n" + "\n".join(no_wgmma)
    # The atomic dK/dV's dQ product on 32-row tiles is computed transposed so that it, too, runs on wgmma.
    atomic = [r for r in rows if r["constexprs"].get("ATOMIC_DQ") and r["constexprs"]["HEAD_DIM"] != 256]
    assert atomic and all(r["mma_sync"] == 0 for r in atomic), [(r["case"], r["mma_sync"]) for r in atomic]


@pytest.mark.parametrize("kernel", ["_attn_fwd_kernel", "_attn_bwd_dkdv_kernel"])
def test_sm90_warp_specialized_configs_specialize(compiled, kernel):
    """A WARP_SPECIALIZE=True config that compiled without specializing (a Triton whose Hopper pass skipped the loop)
    would run as a slower software-pipelined kernel: each, masked or not (" full"), must read by TMA and run a loading
    warpgroup beside its two computing ones (12 warps for num_warps=4, setmaxnreg); the others keep their warps."""
    rows = [r for r in compiled if r["arch"] == 90 and r["kernel"] == kernel and "error" not in r]
    ws = [r for r in rows if r["constexprs"]["WARP_SPECIALIZE"]]
    assert {r["constexprs"]["HEAD_DIM"] for r in ws} == {64, 128}
    assert {r["constexprs"]["FULL_TILES"] for r in ws} == {True, False}
    for r in ws:
        assert r["tma"] and r["setmaxnreg"] and r["wgmma"], r
        assert r["launched_warps"] == 3 * r["num_warps"], r
    for r in rows:
        if r not in ws:
            assert not r["setmaxnreg"] and r["launched_warps"] == r["num_warps"], r


def test_each_cubin_has_the_metadata_a_launcher_needs(compiled, out_dir):
    entries = json.loads((out_dir / "index.json").read_text())
    assert len({e["cubin"] for e in entries}) == len(entries) == len({r["cubin"] for r in compiled})
    for e in entries:
        assert (out_dir / e["cubin"]).read_bytes()[:4] == b"\x7fELF", e["cubin"]
        assert json.loads((out_dir / e["cubin"]).with_suffix(".json").read_text()) == e
        kernel = getattr(aot.kernel_module(e["module"]), e["kernel"])
        assert e["entry"] == e["kernel"] and list(e["signature"]) == kernel.arg_names
        # the interpreter's stand-in for a JITFunction (tests run under TRITON_INTERPRET=1) keeps the function as .fn
        parameters = inspect.signature(kernel.fn).parameters
        constexpr = {n for n in kernel.arg_names if "constexpr" in str(parameters[n].annotation)}
        assert [name for name, _ in e["args"]] == [n for n in kernel.arg_names if n not in constexpr]
        assert set(e["constexprs"]) == constexpr
        assert set(e["divisible_by_16"]) <= {name for name, _ in e["args"]}
        assert e["cubin_params"] == len(e["args"]) + 2  # and Triton's global and profile scratch pointers
        assert e["shared"] == e["resources"]["shared_dynamic"] and e["launched_warps"] >= e["num_warps"]


BENCH_KERNELS = [("bench_overhead", "_empty_kernel"), ("bench_adamw", "_seven_streams_kernel")]
# One child for all of them (each child pays for importing torch and Triton): argv = benchmarks/, tools/, then pairs
# of benchmark module and kernel; prints {kernel: registers} of each sm_90 compile.
_BENCH_KERNEL_CHILD = """
import importlib.util, json, pathlib, sys
bench_dir, tools = pathlib.Path(sys.argv[1]), sys.argv[2]
sys.path[:0] = [str(bench_dir), tools]
from aot import compile_one
regs = {}
for module, name in zip(sys.argv[3::2], sys.argv[4::2]):
    spec = importlib.util.spec_from_file_location(module, bench_dir / (module + ".py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    kernel = getattr(bench, name)
    # pointers are capitalized (fp32 tensors), the other runtime arguments ints, BLOCK the one constexpr
    signature = {a: "*fp32" if a[0].isupper() else "i32" for a in kernel.arg_names if a != "BLOCK"}
    regs[name] = compile_one(kernel, {**signature, "BLOCK": "constexpr"}, {"BLOCK": 1024}, 90, 4, 1)["reg"]
print(json.dumps(regs))
"""


@pytest.fixture(scope="module")
def bench_kernel_registers():
    bench_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    pairs = [name for pair in BENCH_KERNELS for name in pair]
    child = subprocess.run(
        [sys.executable, "-c", _BENCH_KERNEL_CHILD, str(bench_dir), str(TOOLS), *pairs],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "0"},
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.splitlines()[-1])


@pytest.mark.parametrize("bench,kernel", BENCH_KERNELS)
def test_the_benchmarks_own_kernels_compile_for_sm90(bench_kernel_registers, bench, kernel):
    """Kernels the benchmarks launch on a GPU and the interpreter cannot vouch for: one the JIT cannot compile (a kernel
    defined inside a function, say, whose `tl.constexpr` annotation the JIT looks up among the module's globals) would
    fail only there, after its benchmark had run."""
    assert bench_kernel_registers[kernel] > 0  # registers used: a cubin was built


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


def test_sample_compiles_n_per_kernel_and_estimates_the_whole_selection(tmp_path):
    """--sample: N distinct compiles per kernel, each row with its CPU seconds and cubin size, and the cost of the
    whole selection on stderr (what the estimate of a CUDA build's AOT step rests on), its distinct counts those of
    the full run."""
    command = [sys.executable, str(TOOLS / "aot.py"), "--arch", "90", "--dtype", "bf16", "fp32", "--shipped"]
    command += ["--modules", "cross_entropy", "--kernels-dir", str(ROOT / "kernels")]

    def run(*extra, out):
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        child = subprocess.run([*command, *extra, "--out", str(out)], capture_output=True, text=True, env=env)
        assert child.returncode == 0, child.stderr[-3000:]
        return [json.loads(line) for line in child.stdout.splitlines()], child.stderr.strip().splitlines()

    full, _ = run(out=tmp_path / "full")
    distinct = {}
    for r in full:
        distinct.setdefault(r["kernel"], set()).add(r["cubin"])
    rows, summary = run("--sample", "1", "--seed", "3", out=tmp_path / "sample")
    assert sorted(r["kernel"] for r in rows) == sorted(distinct)  # one of each kernel's 2 distinct compiles
    assert all(r["compile_cpu_s"] > 0 for r in rows)
    assert all(r["cubin_bytes"] == (tmp_path / "sample" / r["cubin"]).stat().st_size for r in rows)
    assert summary[-1].startswith(f"all: {sum(map(len, distinct.values()))} distinct compiles, ~"), summary
    for kernel, cubins in distinct.items():
        assert any(line.startswith(f"{kernel}: {len(cubins)} distinct, 1 sampled, ~") for line in summary), summary
    bad = subprocess.run([*command, "--sample", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--sample must be at least 1, got 0" in bad.stderr
