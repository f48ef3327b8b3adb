"""fasttrain.kernels._launch: the host-side launch arithmetic equals triton's own, and the SM count is the device's."""
import pytest
import torch
import triton

from fasttrain.kernels._launch import cdiv, multiprocessor_count, next_power_of_2

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
