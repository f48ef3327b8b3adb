"""Host-side pieces the attention forward (kernels/attention.py) and backward (kernels/attention_backward.py)
share: which configs this machine tunes over, the launch's strides and constexprs, whether TMA can read the inputs,
the scratch allocator for device-made descriptors, and what tools/aot.py compiles ahead of time."""

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from ._attention_configs import flat, pruner
from ._launch import INTERPRETING, next_power_of_2

LOG2E = tl.constexpr(1.4426950408889634)  # globals a kernel reads must be constexpr (the compiler insists)
_HALF = (torch.float16, torch.bfloat16)
# tune_left/right (band_class): causal and full attention mask different shares of their tiles (the
# warp-specialized loops mask all of them), so they tune apart. TMA_ALIGNED: the forward's and dK/dV's (dQ has no
# specialized config). DROPOUT: its kernels do more per score, so they tune apart.
_TUNING_KEY = ("HEAD_DIM", "tune_seqlen", "GROUP", "VARLEN", "tune_left", "tune_right", "TMA_ALIGNED", "DROPOUT")


def this_machine(table):
    """The configs of this machine's GPU arch, or the interpreter's one."""
    if INTERPRETING or not torch.cuda.is_available():
        return table["interpreter"]
    return table[90] if torch.cuda.get_device_capability()[0] >= 9 else table[80]


def autotuned(kernel, by_class, **options):
    """The kernel under an autotuner over the configs of by_class ({head-dim class: [triton.Config]}); options go to
    triton.autotune (reset_to_zero for an output accumulated by atomics)."""
    # tune_seqlen is max_seqlen rounded up to a power of 2, so packed batches of varying length share tunings.
    key = [name for name in _TUNING_KEY if name in kernel.arg_names]
    return triton.autotune(
        configs=flat(by_class), key=key, prune_configs_by={"early_config_prune": pruner(by_class)}, **options
    )(kernel)


def bth_strides(x, varlen):
    """(batch, token, head) element strides; a packed (total, H, D) tensor has batch stride 0."""
    return (0, x.stride(0), x.stride(1)) if varlen else (x.stride(0), x.stride(1), x.stride(2))


def lse_strides(lse, varlen):
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def band_class(edge: int, tune_seqlen: int) -> int:
    """A band edge (left or right) as the tuners key it: +-tune_seqlen once it reaches past every (query, key) pair
    of such a sequence (unbounded), else its sign times its size rounded up to a power of 2. SDPA's top-left causal
    (right = Tq - Tk) and the windows wider than a sequence would otherwise re-tune at every new length."""
    if abs(edge) >= tune_seqlen:
        return tune_seqlen if edge > 0 else -tune_seqlen
    return next_power_of_2(edge) if edge >= 0 else -next_power_of_2(-edge)


def launch_params(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, left, right):
    """(varlen, B, H, Hkv, the constexprs every attention kernel takes, the tuning key's ints: tune_seqlen,
    tune_left, tune_right) of a launch."""
    varlen = cu_seqlens_q is not None
    B = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    H, Hkv, D = q.shape[-2], k.shape[-2], q.shape[-1]
    constexprs = dict(
        GROUP=H // Hkv,
        HEAD_DIM=D,
        HEAD_DIM_PAD=next_power_of_2(D),
        VARLEN=varlen,
        UPCAST=INTERPRETING and q.dtype != torch.float32,
    )
    tune_seqlen = next_power_of_2(max(max_seqlen_q, max_seqlen_k))
    return varlen, B, H, Hkv, constexprs, (tune_seqlen, band_class(left, tune_seqlen), band_class(right, tune_seqlen))


def tma_aligned(*tensors) -> bool:
    """Whether every (.., T, H, D) tensor given can be read in (rows, D) tiles by TMA from any batch, head and row:
    half precision, D a power of 2, and the base and every stride but D's a nonzero multiple of 16 bytes (the copy
    engine's rule; a torch allocation or a whole-head view of one meets it)."""
    for t in tensors:
        if t.dtype not in _HALF:
            return False
        head_dim = t.shape[-1]
        if head_dim & (head_dim - 1) or t.data_ptr() & 15:
            return False
        for stride in t.stride()[:-1]:
            if stride == 0 or stride & 7:  # 8 two-byte elements = 16 bytes; an expanded dim TMA is not known to take
                return False
    return True


def full_tiles(varlen, max_seqlen_q, max_seqlen_k, left, right) -> bool:
    """Every query sees every key and both lengths are multiples of 128 (the widest tile a specialized config
    takes): no tile has a row or column to mask. A constexpr, so the pipelined kernels, which ignore it, also compile
    once per value (once per process and shape class: seconds, not per call)."""
    return (
        not varlen
        and max_seqlen_q % 128 == 0
        and max_seqlen_k % 128 == 0
        and left >= max_seqlen_k - 1
        and right >= max_seqlen_q - 1
    )


def _scratch(size: int, alignment: int, stream):
    """Global memory for the TMA descriptors a kernel makes on the device (triton.set_allocator's contract)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_scratch_allocator():
    """Give Triton an allocator for device-made descriptors unless the caller (or torch) has set one already."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


# ---- ahead-of-time compile (tools/aot.py) --------------------------------------------------------------------------

# Runtime arguments that are not pointers in the inputs' dtype or i32 scalars.
AOT_TYPES = {
    "Lse": "*fp32",
    "Delta": "*fp32",
    "DLse": "*fp32",
    "DQAcc": "*fp32",
    "CuQ": "*i32",
    "CuK": "*i32",
    "scale": "fp32",
    "scale_log2": "fp32",
    "Seed": "*i64",
    "dropout_scale": "fp32",
}
AOT_HEAD_DIMS = {"d64": 64, "d128": 128, "d256": 256}  # each head-dim class compiled at its widest


def aot_launch(head_dim: int, dtype: str) -> dict:
    """The constexprs of the launch compiled ahead of time: dense (not packed), GQA 2:1, no lse gradient."""
    return dict(
        GROUP=2,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=next_power_of_2(head_dim),
        VARLEN=False,
        UPCAST=False,
        HAS_DLSE=False,
        TMA_ALIGNED=dtype in ("fp16", "bf16") and head_dim == next_power_of_2(head_dim),
        FULL_TILES=False,
        DROPOUT=False,
    )


def aot_cases(table_for_arch: dict, dtype: str, dropout: bool = False) -> list[dict]:
    """Every config of one arch's table ({head-dim class: [triton.Config]}) over aot_launch; a warp-specialized
    config compiles twice: its loop masks every tile, or none (FULL_TILES). dropout: each config that takes it
    once more with DROPOUT (not the warp-specialized ones, nor those marked no_dropout)."""
    cases = []
    for cls, configs in table_for_arch.items():
        for c in configs:
            label = f"{cls} " + " ".join(f"{k}={v}" for k, v in c.kwargs.items()) + f" w{c.num_warps} s{c.num_stages}"
            case = dict(
                label=label,
                constexprs={**aot_launch(AOT_HEAD_DIMS[cls], dtype), **c.kwargs},
                num_warps=c.num_warps,
                num_stages=c.num_stages,
            )
            cases.append(case)
            if c.kwargs.get("WARP_SPECIALIZE"):
                cases.append(
                    {**case, "label": label + " full", "constexprs": {**case["constexprs"], "FULL_TILES": True}}
                )
            elif dropout and not getattr(c, "no_dropout", False):
                cases.append(
                    {**case, "label": label + " dropout", "constexprs": {**case["constexprs"], "DROPOUT": True}}
                )
    return cases
