"""Compile fasttrain's Triton kernels ahead of time for sm_80 and sm_90 without a GPU: a resource report, and cubins
with the metadata a launcher needs.

What to compile lives beside the kernels: every module of fasttrain.kernels that defines `aot_kernels(arch, dtype)`
returns a list of plain dicts, one per @triton.jit kernel,

    {"kernel": <the JIT function>,
     "types": {argument: Triton type},  # runtime arguments other than dtype pointers and i32 scalars, e.g. "*fp32"
     "cases": [{"label": str, "constexprs": {name: value}, "num_warps": int, "num_stages": int (default 3)}],
     "divisible": [argument, ...]}  # optional: the arguments compiled as multiples of 16 (default: see below)

and imports nothing from here. A module whose aot_kernels also takes `shipped` ships cubins: with shipped=True it
lists every specialization its ops launch through the C++ launch path (fasttrain/_aot.py), which `--shipped` compiles
(a CUDA build does, docs/backends.md); without it, the small sample that CI compiles.

This tool builds each case's signature from the kernel's parameters in order: a constexpr takes its value from the case
(a constexpr the case leaves out is an error; names the kernel lacks are ignored, so a family shares one dict), a
runtime argument its type from `types`, else "*<dtype>" when capitalized (a pointer, by the kernels' naming) and "i32"
when not. Pointers and the stride_* arguments (but stride_l*, the logsumexp's) are compiled as multiples of 16, as the
JIT specializes them at a real launch (`divisible`), unless the entry names its own; a launcher of these cubins must
pass only such values.

    python tools/aot.py --arch 80 90                 # one JSON row per (arch, dtype, kernel, case) on stdout
    python tools/aot.py --arch 80 90 --dtype bf16 fp16 --out DIR --jobs 8 --kernels-dir kernels
    python tools/aot.py --arch 80 90 --dtype bf16 fp16 fp32 --shipped --out DIR --jobs 8   # what a CUDA build ships
    python tools/aot.py --arch 90 --dtype bf16 fp16 fp32 --shipped --sample 4 --out DIR   # what shipping it costs

--out DIR also writes DIR/sm_<arch>/<kernel>-<dtype>-<id>.cubin and, beside each, a .json of its metadata, and
DIR/index.json holding all of them: kernel, module, arch, dtype, case (the label), entry (the cubin's function),
signature (every parameter in order), args (the runtime arguments in launch order with their types), cubin_params
(how many the cubin's function takes: args and then the scratch pointers Triton adds, global then profile), constexprs,
divisible_by_16, num_warps as configured and launched_warps as launched, num_stages, shared (the dynamic shared
memory to launch with), Triton's scratch sizes and alignments, its version and hash, and the cuobjdump resources.
<id> is a hash of what was compiled, so a case keeps its file name from run to run. A case that fails to compile is
reported with "error" and does not stop the others; the exit status is then 1.

--sample N compiles N distinct compiles per kernel (seeded by --seed) and prints to stderr, per kernel and in all,
what the whole selection would cost: distinct compiles, and from the sample the mean compile time (CPU seconds of
this process and its children, e.g. ptxas: a build's CPU cost whatever its core count) and, with --out, the mean
cubin size. Every row carries its case's "compile_cpu_s".

Run with TRITON_INTERPRET unset or 0: an interpreted kernel cannot be compiled. The kernels come from the installed
fasttrain, or with --kernels-dir from a folder (a build step's, before fasttrain is installed).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import multiprocessing
import os
import pkgutil
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory per block (opt-in maximum) on H100 / A100
DTYPE = {90: "bf16", 80: "fp16"}  # the default half type per arch: one each keeps CI short; both share the code paths
# Modules first whose cases take longest, so that a pool ends on the short ones.
_ORDER = ("attention_backward", "attention", "decode")


@dataclasses.dataclass(frozen=True)
class Case:
    """One compile: a kernel's signature and constexprs for one arch, dtype and launch configuration."""

    module: str
    kernel: str  # the JIT function's name in the module
    arch: int
    dtype: str
    label: str
    signature: dict  # every parameter in order: a Triton type, or "constexpr"
    constexprs: dict
    num_warps: int
    num_stages: int
    divisible: tuple  # arguments compiled as multiples of 16

    def key(self) -> str:
        """A hash of what is compiled (not of the label): equal keys give the same cubin."""
        what = [self.module, self.kernel, self.arch, self.signature, self.constexprs, self.num_warps, self.num_stages]
        return hashlib.sha256(json.dumps([*what, self.divisible], sort_keys=True).encode()).hexdigest()[:16]

    def row(self) -> dict:
        return {
            "kernel": self.kernel,
            "module": self.module,
            "arch": self.arch,
            "dtype": self.dtype,
            "case": self.label,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "constexprs": self.constexprs,
        }


def signature(kernel, types: dict, constexprs: dict, dtype: str) -> tuple[dict, dict]:
    """(signature, constexprs) of one compile of kernel: see the module's docstring for the rules."""
    sig, values = {}, {}
    for p in kernel.params:
        if p.is_constexpr:
            if p.name not in constexprs:
                raise ValueError(f"{kernel.__name__}: no value for constexpr {p.name}")
            sig[p.name], values[p.name] = "constexpr", constexprs[p.name]
        else:
            sig[p.name] = types.get(p.name) or (f"*{dtype}" if p.name[0].isupper() else "i32")
    return sig, values


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


_package = "fasttrain.kernels"  # where the kernel modules are imported from: see use_kernels_dir


def use_kernels_dir(path) -> None:
    """Import the kernels from a folder (a checkout's kernels/) rather than the installed fasttrain.kernels, as a build
    step must before fasttrain is installed; the kernels import nothing from fasttrain, so the folder alone serves."""
    global _package
    _package = "_fasttrain_kernels"
    init = Path(path).resolve() / "__init__.py"
    spec = importlib.util.spec_from_file_location(_package, init, submodule_search_locations=[str(init.parent)])
    sys.modules[_package] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[_package])


def kernel_module(name: str):
    return importlib.import_module(f"{_package}.{name}")


def ships(module: str) -> bool:
    """Whether a kernel module's aot_kernels takes `shipped` (its cubins ship in a CUDA build's wheel)."""
    return "shipped" in inspect.signature(kernel_module(module).aot_kernels).parameters


def kernel_modules(shipped: bool = False) -> list[str]:
    """The kernel modules that describe an ahead-of-time compile (with shipped, those that ship cubins), longest
    first."""
    package = importlib.import_module(_package)
    names = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    names = [n for n in names if hasattr(kernel_module(n), "aot_kernels") and (not shipped or ships(n))]
    return sorted(names, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))


@functools.cache
def module_cases(module: str, arch: int, dtype: str, shipped: bool = False) -> tuple[Case, ...]:
    """Every case a kernel module describes for arch and dtype (with shipped, its shipped set), in its order."""
    mod = kernel_module(module)
    out = []
    for entry in mod.aot_kernels(arch, dtype, shipped=True) if shipped else mod.aot_kernels(arch, dtype):
        kernel = entry["kernel"]
        for case in entry["cases"]:
            sig, values = signature(kernel, entry.get("types", {}), case["constexprs"], dtype)
            out.append(
                Case(
                    module=module,
                    kernel=kernel.__name__,
                    arch=arch,
                    dtype=dtype,
                    label=case["label"],
                    signature=sig,
                    constexprs=values,
                    num_warps=case["num_warps"],
                    num_stages=case.get("num_stages", 3),
                    divisible=tuple(entry["divisible"]) if "divisible" in entry else divisible(kernel),
                )
            )
    return tuple(out)


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


def compile_kernel(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int, hints=()):
    """Triton's CompiledKernel of one case; `hints` names the arguments compiled as multiples of 16."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    # Without the hints that a real launch's JIT would give, loads compile unvectorized and some kernels spill.
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in hints}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton_compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def report(compiled) -> dict:
    """What the resource report gives per case: cuobjdump's counts, the dynamic shared memory, and which of the
    Hopper and Ampere instructions the PTX uses."""
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


def compile_one(
    kernel, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int, hints: tuple = ()
) -> dict:
    """report() of one compile (tools/aot_sweep.py and the benchmarks' kernels call this)."""
    return report(compile_kernel(kernel, signature, constexprs, arch, num_warps, num_stages, hints))


# Launch settings of Triton's metadata; a release that lacks one (an older Triton) gives null.
_LAUNCH_FIELDS = (
    "num_ctas",
    "global_scratch_size",
    "global_scratch_align",
    "profile_scratch_size",
    "profile_scratch_align",
    "launch_pdl",
    "launch_cooperative_grid",
)


def metadata(case: Case, compiled, cubin_name: str, used: dict) -> dict:
    """The .json beside a cubin: what a launcher needs to load and call it, and what it was compiled from."""
    md = compiled.metadata
    entry = compiled.asm["ptx"].split(".entry", 1)[1].split(")", 1)[0]  # the function's parameter list
    return {
        **case.row(),
        "cubin": cubin_name,
        "entry": md.name,
        "signature": case.signature,
        "args": [[name, t] for name, t in case.signature.items() if t != "constexpr"],
        "cubin_params": len(re.findall(r"\.param\b", entry)),
        "divisible_by_16": list(case.divisible),
        "launched_warps": md.num_warps,
        "shared": md.shared,
        **{field: getattr(md, field, None) for field in _LAUNCH_FIELDS},
        "triton": getattr(md, "triton_version", None) or importlib.import_module("triton").__version__,
        "hash": md.hash,
        "resources": used,
    }


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas, cuobjdump)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _task_case(task: tuple) -> Case:
    """The Case a run_case task compiles."""
    module, arch, dtype, index, _, shipped = task
    return module_cases(module, arch, dtype, shipped)[index]


def _sample(tasks: list, n: int, seed: int) -> list:
    """n of each kernel's tasks (all where it has fewer), drawn with seed, in their order."""
    by_kernel: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        by_kernel.setdefault(_task_case(task).kernel, []).append(i)
    rng = random.Random(seed)
    keep = {i for ids in by_kernel.values() for i in rng.sample(ids, min(n, len(ids)))}
    return [t for i, t in enumerate(tasks) if i in keep]


def _cost(rows: list, distinct: collections.Counter) -> str:
    """--sample's summary: per kernel and in all, distinct compiles and the whole selection's estimated CPU seconds
    and cubin megabytes (a sampled mean times the distinct count)."""
    cpu, size = collections.defaultdict(list), collections.defaultdict(list)
    for row in rows:
        cpu[row["kernel"]].append(row["compile_cpu_s"])
        if "cubin_bytes" in row:
            size[row["kernel"]].append(row["cubin_bytes"])
    lines, total_s, total_mb = [], 0.0, 0.0
    for kernel, n in distinct.items():
        est_s = n * statistics.mean(cpu[kernel])
        est_mb = n * statistics.mean(size[kernel]) / 1e6 if size[kernel] else float("nan")
        total_s, total_mb = total_s + est_s, total_mb + est_mb
        lines.append(f"{kernel}: {n} distinct, {len(cpu[kernel])} sampled, ~{est_s:.0f} CPU s, ~{est_mb:.1f} MB")
    lines.append(f"all: {sum(distinct.values())} distinct compiles, ~{total_s:.0f} CPU s, ~{total_mb:.0f} MB of cubins")
    return "\n".join(lines)


def run_case(module: str, arch: int, dtype: str, index: int, out: str | None, shipped: bool = False) -> dict:
    """Compile case `index` of module_cases(module, arch, dtype, shipped): its report row, with "error" if it
    failed."""
    case = module_cases(module, arch, dtype, shipped)[index]
    row = case.row()
    try:
        kernel = getattr(kernel_module(module), case.kernel)
        start = _cpu_seconds()
        compiled = compile_kernel(
            kernel, case.signature, case.constexprs, arch, case.num_warps, case.num_stages, case.divisible
        )
        used = report(compiled)
        used["compile_cpu_s"] = round(_cpu_seconds() - start, 3)
    except Exception as e:  # reported per case, so one bad config does not hide the others
        row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        return row
    row.update(used)
    if out is not None:
        name = f"sm_{arch}/{case.kernel}-{dtype}-{case.key()}"
        path = Path(out) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".cubin").write_bytes(compiled.asm["cubin"])
        row["cubin_bytes"] = len(compiled.asm["cubin"])
        path.with_suffix(".json").write_text(json.dumps(metadata(case, compiled, name + ".cubin", used), indent=1))
        row["cubin"] = name + ".cubin"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(SHARED_LIMIT), required=True)
    parser.add_argument("--dtype", nargs="+", choices=["bf16", "fp16", "fp32"], help="default: bf16 sm_90, fp16 sm_80")
    parser.add_argument("--kernel", nargs="+", help="only these kernels (JIT function names)")
    parser.add_argument("--modules", nargs="+", help="only these kernel modules (e.g. norms)")
    parser.add_argument("--cases", help="only the cases whose label matches this regular expression (re.search)")
    parser.add_argument("--shipped", action="store_true", help="the shipped sets of the modules that ship cubins")
    parser.add_argument("--out", help="write cubins and their metadata here")
    parser.add_argument("--jobs", type=int, default=1, help="compiles side by side (processes)")
    parser.add_argument("--sample", type=int, help="compile this many distinct compiles per kernel; print the cost")
    parser.add_argument("--seed", type=int, default=0, help="--sample's draw")
    parser.add_argument("--kernels-dir", help="import the kernels from this folder (default: fasttrain.kernels)")
    args = parser.parse_args()
    if args.sample is not None and args.sample < 1:
        parser.error(f"--sample must be at least 1, got {args.sample}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    if args.kernels_dir is not None:
        use_kernels_dir(args.kernels_dir)
    # One task per distinct compile: a case equal to an earlier one (same key) reuses its result under its own label.
    tasks, rows, first = [], [], {}
    modules = kernel_modules(args.shipped)
    if args.modules:
        if unknown := set(args.modules) - set(modules):
            raise SystemExit(
                f"--modules: no such {'shipping ' if args.shipped else ''}kernel module: {sorted(unknown)}"
            )
        modules = [m for m in modules if m in args.modules]
    for module in modules:
        for arch in args.arch:
            for dtype in args.dtype or [DTYPE[arch]]:
                for i, case in enumerate(module_cases(module, arch, dtype, args.shipped)):
                    if args.kernel and case.kernel not in args.kernel:
                        continue
                    if args.cases and not re.search(args.cases, case.label):
                        continue
                    rows.append((case, first.setdefault((case.key(), dtype), len(tasks))))
                    if rows[-1][1] == len(tasks):
                        tasks.append((module, arch, dtype, i, args.out, args.shipped))
    distinct = collections.Counter(_task_case(t).kernel for t in tasks)
    if args.sample is not None:
        tasks = _sample(tasks, args.sample, args.seed)
        rows = [(_task_case(t), i) for i, t in enumerate(tasks)]  # one row per sampled compile
    if args.jobs > 1:
        # Forked workers inherit the imported kernels and the enumerated cases; this process has compiled nothing, so
        # they share no compiler state.
        pool = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork"))
    else:
        pool = concurrent.futures.ThreadPoolExecutor(1)
    with pool:
        results = [pool.submit(run_case, *task) for task in tasks]
        failed, entries, done = False, {}, []
        for case, t in rows:  # in order, each as soon as its compile is done
            row = {**results[t].result(), **case.row()}
            failed |= "error" in row
            done.append(row)
            try:
                print(json.dumps(row), flush=True)
            except BrokenPipeError:  # the reader left (`| head`): the rest still compiles for --out, unprinted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            if "cubin" in row:
                entries[row["cubin"]] = json.loads((Path(args.out) / row["cubin"]).with_suffix(".json").read_text())
    if args.out is not None:
        Path(args.out, "index.json").write_text(json.dumps(list(entries.values()), indent=1))
    if args.sample is not None:
        print(_cost([r for r in done if "error" not in r], distinct), file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
