"""Host-side launch helpers: whether Triton interprets, arithmetic on plain Python ints, the SM count, and a tuner
over whole launch plans.

`triton.cdiv` and `triton.next_power_of_2` are constexpr_functions (triton 3.7.1): called from host code, each call
goes through JITCallable.__call__, which unwraps its arguments as constexprs and imports triton.language.core, many
times the cost of the same arithmetic on Python ints here. Kernels keep using triton's (tl.cdiv) inside @triton.jit
code.
"""

import functools
import os
import traceback
import warnings

import torch

# The one reading of TRITON_INTERPRET in kernels/: Triton reads it when a @triton.jit decorator runs, so it is fixed
# for the process once these modules are imported. The interpreter runs on CPU tensors, one config per kernel.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (0 for 0), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device (cached: torch.cuda.get_device_properties builds a Python object per call)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


class PlanTuner:
    """An autotuner over whole alternatives (each a callable launching one or more autotuned kernels and returning
    the result) rather than one kernel's configs. At a key's first call where kernels can be timed it runs each plan
    once, so that its kernels tune themselves, times it by triton.testing.do_bench and keeps the fastest; a plan that
    raises (a config this GPU rejects, memory) is timed as inf, with a warning, unless every plan does. Where
    nothing can be timed (the interpreter, a CUDA graph being captured) it answers the key's earlier choice, else
    `default`, and remembers nothing new. `cache` and `configs_timings` carry the names triton's Autotuner gives
    them, so the benchmarks record plans and tiles alike."""

    def __init__(self, default: str):
        self.default = default
        self.cache: dict = {}
        self.configs_timings = None

    def choose(self, key, plans: dict, timeable: bool) -> str:
        if not timeable:
            return self.cache.get(key, self.default)
        if key not in self.cache:
            from triton.testing import do_bench  # at call time: a process that never tunes never imports it

            timings, failed = {}, {}
            for name, plan in plans.items():
                try:
                    plan()
                    timings[name] = do_bench(plan, quantiles=(0.5, 0.2, 0.8))
                except Exception as e:  # noqa: BLE001 - any failure: the other plans may still serve
                    traceback.clear_frames(e.__traceback__)  # after an OOM, the next plan needs that memory
                    failed[name], timings[name] = e, [float("inf")] * 3
            if len(failed) == len(plans):
                raise next(iter(failed.values()))
            for name, e in failed.items():
                warnings.warn(
                    f"fasttrain: the {name!r} plan failed here and is left out ({type(e).__name__}: {e})",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.cache[key] = min(timings, key=lambda name: timings[name][0])
            self.configs_timings = timings
        return self.cache[key]
