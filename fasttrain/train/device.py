"""Where and in what precision a run computes: the device, the precision, autocast, and the peak FLOP/s for MFU."""

from __future__ import annotations

import contextlib

import torch

# Dense bf16 tensor-core peaks from the vendors' datasheets, for MFU; other devices report none. Matched by substring
# in order, so the most specific name comes first.
PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "A10": 125e12,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but torch sees no CUDA device")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_for(precision: str, device: torch.device, cache_enabled: bool = True):
    """A zero-argument context-manager factory: autocast in bf16/fp16, nothing in fp32. cache_enabled=False for a
    CUDA graph's capture, whose cached weight casts would not outlive it."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)
