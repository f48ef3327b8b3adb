"""fasttrain.kernels._launch: the host-side launch arithmetic equals triton's own, the SM count is the device's, and
the plan tuner keeps the plan it timed fastest."""

import pytest
import torch
import triton
import triton.testing

from fasttrain.kernels._launch import PlanTuner, cdiv, multiprocessor_count, next_power_of_2

EDGES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 97, 768, 1023, 1024, 1025, 50257, 2**31 - 1, 2**31, 2**31 + 1, 2**40 + 3]


def test_next_power_of_2_is_tritons():
    for n in EDGES + list(range(2, 4100, 7)):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def test_cdiv_is_tritons():
    for a in EDGES:
        for b in (1, 2, 3, 16, 32, 64, 128, 132, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


@pytest.mark.gpu
def test_gpu_multiprocessor_count_is_the_devices():
    device = torch.device("cuda", torch.cuda.current_device())
    assert multiprocessor_count(device) == torch.cuda.get_device_properties(device).multi_processor_count > 0


def test_plan_tuner_runs_each_plan_once_then_times_it_and_keeps_the_fastest(monkeypatch):
    ran = []
    plans = {name: (lambda name=name: ran.append(name) or name) for name in ("slow", "fast")}
    median_ms = {"slow": 2.0, "fast": 1.0}
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, quantiles: [median_ms[fn()], 0.0, 9.0])
    tuner = PlanTuner(default="slow")
    assert tuner.choose("k", plans, timeable=False) == "slow" and not ran and not tuner.cache
    assert tuner.choose("k", plans, timeable=True) == "fast"
    assert ran == ["slow", "slow", "fast", "fast"]  # once (its kernels tune), then under the timer
    assert tuner.configs_timings == {"slow": [2.0, 0.0, 9.0], "fast": [1.0, 0.0, 9.0]}
    assert tuner.choose("k", plans, timeable=True) == "fast" and len(ran) == 4  # remembered per key
    median_ms.update(slow=0.5)
    assert tuner.choose("other key", plans, timeable=True) == "slow"
    assert tuner.choose("k", plans, timeable=False) == "fast" and len(ran) == 8  # e.g. in a CUDA graph capture


def test_plan_tuner_leaves_out_a_plan_that_fails_unless_every_plan_does(monkeypatch):
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, quantiles: [fn(), 0.0, 0.0])

    def broken():
        raise RuntimeError("CUDA out of memory")

    tuner = PlanTuner(default="broken")
    with pytest.warns(RuntimeWarning, match="'broken' plan failed here.*out of memory"):
        assert tuner.choose("k", {"broken": broken, "slow": lambda: 5.0}, timeable=True) == "slow"
    assert tuner.configs_timings["broken"] == [float("inf")] * 3
    with pytest.raises(RuntimeError, match="out of memory"):
        tuner.choose("other key", {"broken": broken}, timeable=True)
    assert "other key" not in tuner.cache
