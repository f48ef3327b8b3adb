"""The attention forward's aot path: the C++ launcher's global scratch (the sm_90 forward's warp-specialized configs
build TMA descriptors on the device, in memory Triton's launcher asks its allocator for), tested without a GPU."""

import pytest

import fasttrain._C as C

# A registered kernel's parameters (csrc/aot_launch.cpp's spec of the decode combine), for registration-only cases.
_COMBINE = (
    "_decode_combine_kernel",
    ["HEAD_DIM", "BLOCK_S", "BLOCK_D"],
    ["O_PART", "LSE_PART", "Out", "LSE", "stride_ps", "stride_ls", "stride_ob", "stride_ot", "stride_oh",
     "stride_lb", "stride_lh", "stride_lt", "tq", "n_heads", "num_splits"],
)  # fmt: skip


def _register(global_scratch=0, profile_scratch=0, align=1, params=2):
    kernel, constexprs, args = _COMBINE
    types = ["*fp32", "*fp32", "*fp16", "*fp32"] + ["i32"] * (len(args) - 4)
    C.aot_register(
        kernel, "fp16", [64, 2, 64], constexprs, args, types, [], 4, 1, 0, len(args) + params, global_scratch,
        profile_scratch, kernel, "x", b"", global_scratch_align=align,
    )  # fmt: skip


def test_registration_takes_global_scratch_and_refuses_profile_scratch():
    C.aot_clear()
    try:
        _register(global_scratch=128, align=128)
        assert C.aot_registered() == 1
        with pytest.raises(RuntimeError, match="profile scratch"):
            _register(profile_scratch=64)
        with pytest.raises(RuntimeError, match="no scratch parameter"):
            _register(global_scratch=128, params=0)
        with pytest.raises(RuntimeError, match="alignment 3 is not a power of 2"):
            _register(global_scratch=128, align=3)
        with pytest.raises(RuntimeError, match="alignment 1024"):
            _register(global_scratch=128, align=1024)
        assert C.aot_registered() == 1
    finally:
        C.aot_clear()
