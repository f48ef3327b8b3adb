"""What every benchmark shares: timing, the measured copy-bandwidth ceiling, provenance, and the JSON results file.

Rules (docs/benchmarks.md): medians after warm-up, random inputs, correctness checked before timing, every
result file records device, versions, git commit, command and date. The benchmarks ship inside the package
(fasttrain.benchmarks) and run as `fasttrain bench NAME` or `python -m fasttrain.benchmarks.bench_NAME`; results go to
--out, by default ./benchmarks/results/<device>/ under the working directory (in a source checkout's root: beside the
scripts).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

import fasttrain
from fasttrain._files import atomic_write_text
from fasttrain.info import cpu_name

RESULTS_DIR = Path("benchmarks") / "results"
"""Where results go without --out: relative to the working directory, never inside the installed package."""


def parse_args(description: str, extra=None) -> argparse.Namespace:
    """Common flags: --device, --quick (a smoke-test subset), --out (results folder)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a few small shapes only (smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default ./benchmarks/results/<device>)")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()} x{torch.get_num_threads()} threads"


def device_slug(device: str) -> str:
    """Folder name for results: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc-2t' (the CPU's model, so that two machines'
    results never share a folder)."""

    def slug(name: str) -> str:
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")

    if device == "cuda":
        return slug(torch.cuda.get_device_name())
    return f"cpu-{slug(cpu_name())}-{torch.get_num_threads()}t"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, warmup: int = 3, min_run_time: float = 0.5) -> float:
    """Median milliseconds per call of fn() after warm-up."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    from torch.utils import benchmark

    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def time_interleaved_ms(fns: dict, device: str, rounds: int = 5, min_run_time: float = 0.2) -> dict:
    """Median ms per call of each fn, timed in alternation over several rounds (median of the round medians), so a
    memory-bandwidth drift of the (shared, virtual) machine hits every variant alike: back-to-back single runs of
    one variant there can differ by a third."""
    per_round: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per_round[name].append(time_ms(fn, device, warmup=1, min_run_time=min_run_time))
    return {name: sorted(v)[len(v) // 2] for name, v in per_round.items()}


def relative_error(pairs, what: str, bound: float) -> float:
    """The largest max|got - want| / max|want| over the (got, want) pairs, want in float64; AssertionError naming
    `what` unless it is under bound (NaN fails too)."""
    err = max(((got.double() - want).abs().max() / want.abs().max()).item() for got, want in pairs)
    if not err < bound:
        raise AssertionError(f"fasttrain {what} differs from float64 by {err:.3g} (bound {bound})")
    return err


def memory_bound_rows(runs: dict, device: str, nbytes: int, copy_gbs: float, **fields) -> list[dict]:
    """Warm up the runs (compiling any torch.compile one outside the timed region), time them in alternation
    (time_interleaved_ms) and give a row per run: `fields`, then its ms, the GB/s of moving nbytes, that as % of
    copy_gbs, and its speed over the "torch eager" run."""
    for run in runs.values():
        run()
    times = time_interleaved_ms(runs, device)
    rows = []
    for name, ms in times.items():
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append(
            {
                **fields,
                "impl": name,
                "ms": ms,
                "GB/s": gbs,
                "%copy": 100 * gbs / copy_gbs,
                "x eager": times["torch eager"] / ms,
            }
        )
    return rows


def eager_add_norm(norm_fn):
    """A pre-norm block's residual add as an eager script writes it, `s = branch + residual`, then torch's norm:
    the baseline for fasttrain's add_layer_norm / add_rms_norm, with their (branch, residual, shape, ...) arguments."""

    def add_norm(branch, residual, *args):
        s = branch + residual
        return norm_fn(s, *args), s

    return add_norm


def profile_call(fn, device: str, top: int = 8) -> dict:
    """One warm call of fn() under torch.profiler: where its time went. `top_cpu`: the host ops with the most self CPU
    time (ms). On CUDA also `gpu_busy_ms`, the time some kernel, copy or memset ran (the union of their intervals),
    `gpu_span_ms` from the first one's start to the last one's end, and `top_gpu`, the kernels that took the most
    (ms, summed by name). A busy time well under the call's wall time means the GPU waited for the host."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.events()

    def ranked(pairs) -> list:
        totals: dict = {}
        for name, us in pairs:
            totals[name] = totals.get(name, 0.0) + us
        return [[name, round(us / 1e3, 4)] for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:top]]

    out = {"top_cpu": ranked((e.name, e.self_cpu_time_total) for e in events if e.device_type == DeviceType.CPU)}
    if device == "cuda":
        # Kineto reports each kernel, copy and memset as an event on the device; user annotations mirror CPU ranges.
        device_events = [
            e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        ]
        spans = sorted((e.time_range.start, e.time_range.end) for e in device_events)
        busy, reach = 0.0, float("-inf")
        for start, end in spans:
            busy += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        out.update(
            gpu_busy_ms=busy / 1e3,
            gpu_span_ms=(spans[-1][1] - spans[0][0]) / 1e3 if spans else 0.0,
            gpu_events=len(spans),
            top_gpu=ranked((e.name, e.time_range.elapsed_us()) for e in device_events),
        )
    return out


def copy_bandwidth_gbs(device: str, nbytes: int | None = None) -> float:
    """Measured ceiling for memory-bound kernels: bytes read plus written per second by a plain tensor copy."""
    nbytes = nbytes or (1 << 30 if device == "cuda" else 256 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def announce_copy_bandwidth(device: str) -> float:
    """copy_bandwidth_gbs, printed with the device name: the ceiling every memory-bound benchmark reports against."""
    gbs = copy_bandwidth_gbs(device)
    print(f"{device_name(device)}: copy bandwidth {gbs:.1f} GB/s")
    return gbs


def matmul_tflops(device: str, n: int = 8192, dtype=torch.bfloat16) -> float:
    """Measured ceiling for compute-bound kernels: a large square matmul."""
    if device != "cuda":
        n, dtype = 2048, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def checkout() -> Path | None:
    """The fasttrain source checkout the benchmark runs from (the working directory, its root), or None: the
    benchmarks import the installed package, and this is what its commit and differences are read from."""
    root = Path.cwd()
    if (root / "fasttrain" / "__init__.py").is_file() and (root / "benchmarks" / "common.py").is_file():
        return root
    return None


def _git(root: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout
    except Exception:
        return None


def _git_commit() -> str:
    """The checkout's HEAD, with '+dirty' when tracked files under csrc/, kernels/, fasttrain/ or benchmarks/ (but its
    results/, which each run rewrites) differ from it; 'unknown' outside a checkout."""
    root = checkout()
    head = None if root is None else _git(root, "rev-parse", "HEAD")
    if head is None:
        return "unknown"
    dirty = _git(
        root,
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        "csrc",
        "kernels",
        "fasttrain",
        "benchmarks",
        ":(exclude)benchmarks/results",
    )
    return head.strip() + ("+dirty" if dirty else "")


def installed_differs() -> list[str]:
    """The checkout's Python files that the imported fasttrain does not hold byte for byte (the benchmarks import the
    installed package, not the checkout: an edit not reinstalled is not what was timed). The wheel maps kernels/ and
    benchmarks/ to fasttrain/kernels/ and fasttrain/benchmarks/. Empty outside a checkout."""
    root, installed = checkout(), Path(fasttrain.__file__).resolve().parent
    if root is None or installed == root / "fasttrain":  # nothing to compare, or run against the source tree itself
        return []
    differ = []
    for folder, package in (
        ("fasttrain", installed),
        ("kernels", installed / "kernels"),
        ("benchmarks", installed / "benchmarks"),
    ):
        for source in sorted((root / folder).rglob("*.py")):
            copy = package / source.relative_to(root / folder)
            if not copy.is_file() or copy.read_bytes() != source.read_bytes():
                differ.append(str(source.relative_to(root)))
    return differ


def provenance(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "fasttrain_path": str(Path(fasttrain.__file__).resolve().parent),
        "fasttrain_version": fasttrain.__version__,
        "installed_differs_from_checkout": installed_differs(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _autotuners() -> dict:
    """{"attention._attn_fwd": Autotuner, ...} for every Triton autotuner fasttrain.kernels has imported, and every
    PlanTuner (attention_backward._backward_plans: dQ by atomics or by its own kernel)."""
    modules = {name.rsplit(".", 1)[1]: m for name, m in sys.modules.items() if name.startswith("fasttrain.kernels.")}
    if not modules:
        return {}
    from triton.runtime.autotuner import Autotuner

    from fasttrain.kernels._launch import PlanTuner

    return {
        f"{module_name}.{name}": obj
        for module_name, module in sorted(modules.items())
        for name, obj in vars(module).items()
        if isinstance(obj, (Autotuner, PlanTuner))
    }


def autotune_choices() -> dict:
    """The config each Triton autotuner in fasttrain.kernels chose, and the plan each PlanTuner chose, per tuning key:
    {"attention._attn_fwd": {"(128, 2048, 1, False, ...)": "BLOCK_M: 128, BLOCK_N: 64, num_warps: 8, ..."}}. Empty
    until a GPU run tuned."""
    return {
        name: {str(key): str(config) for key, config in tuner.cache.items()}
        for name, tuner in _autotuners().items()
        if tuner.cache
    }


def take_tuning_timings() -> dict:
    """What each autotuner measured at its latest tuning since the last call, and forget it: {"attention._attn_fwd":
    {"BLOCK_M: 128, ...": median ms}} (inf: the config did not fit). Every candidate's time at one shape, i.e. the
    side-by-side of the kernel's variants that the autotuner ran anyway."""
    taken = {}
    for name, tuner in _autotuners().items():
        timings = getattr(tuner, "configs_timings", None)
        if timings:
            taken[name] = {str(config): t[0] if isinstance(t, (list, tuple)) else t for config, t in timings.items()}
            tuner.configs_timings = None
    return taken


def write_results(
    name: str, device: str, rows: list[dict], ceilings: dict, out: Path | None = None, quick: bool = False
) -> Path:
    """Write {provenance, ceilings, rows, autotuned} atomically to <out or ./benchmarks/results/<device>>/<name>.json;
    return the path. `autotuned` records which tile each Triton autotuner picked (benchmarks/NOTES.md reads it). A
    --quick run writes <name>.quick.json: a smoke test's subset never replaces a full run's rows (nor README's table).
    """
    folder = out or RESULTS_DIR / device_slug(device)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{'.quick' if quick else ''}.json"
    prov = provenance(device)
    if prov["installed_differs_from_checkout"]:
        print(
            f"warning: the installed fasttrain ({prov['fasttrain_path']}) differs from this checkout in "
            f"{prov['installed_differs_from_checkout'][:5]}: reinstall before measuring",
            file=sys.stderr,
        )
    atomic_write_text(
        path,
        json.dumps(
            {
                "benchmark": name,
                "quick": quick,
                **prov,
                "ceilings": ceilings,
                "rows": rows,
                "autotuned": autotune_choices(),
            },
            indent=1,
        ),
    )
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "-" if v is None else str(v)


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_mb(run, device: str) -> float | None:
    """Memory a call of run() adds at its peak, over what is held before it: the CUDA allocator's peak, or on a
    Linux CPU the peak resident set (None where /proc cannot reset it)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not Path("/proc/self/clear_refs").exists():
        return None
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory that malloc keeps resident would hide a call's own
    base = _rss_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set (VmHWM) to the current one
    run()
    return _rss_mb("VmHWM") - base
