"""Host time of the aot paths (bench_overhead.AOT_OPS: the norms, rotary, cross-entropy; decode with --decode; and
rms_norm and add_rms_norm, at layer_norm's shape beside torch.nn.functional.rms_norm) against torch's op (for rotary
the eager rotation) and the Triton path, interleaved, without a GPU: each round times torch's op, fasttrain's Triton
path with its launches skipped (bench_overhead.launches_skipped) and its aot path with its launches dropped
(bench_overhead.aot_launches_dropped), with and without the op's short path (fasttrain/ops/norms.py, rotary.py and
cross_entropy.py _aot_short: the public function straight to the C++ op), one after another, and keeps each one's
minimum over the rounds, which other tenants' load on a shared machine can only raise. Time is the calling thread's
CPU time (a CPU tensor's backward runs on the calling thread too), so a preempted interval does not count. One
intra-op thread: the ops are tiny.

With --decode, flash_attn_with_kvcache's generation-loop call instead (fp16, B 1 x H 12 x D 64, a 512-row cache,
one token appended): the aot path with and without its short path, the C++ op called alone, and torch's step on a
static cache as transformers' StaticCache makes it (the new K and V rows copied in at their position by index_copy_,
then SDPA over the whole cache under a boolean mask of the filled rows, in SDPA's (B, H, T, D) layout). On a CPU
torch computes the attention, which the dropped launch does not: its row runs the same calls on a 1-row cache, so
the attention's arithmetic is negligible and the row measures torch's host cost per step (dispatch, checks, the
CPU kernels' setup), not a 512-row attention. No Triton row (the interpreter computes it too).

    python tools/aot_host_ab.py [--rounds 25] [--calls 200] [--ops cross_entropy]   # us per call, fwd and fwd + bwd
    python tools/aot_host_ab.py --decode

With --attention, flash_attn_func's common eager call instead (fp16, B 1 x T 1 x H 12 x D 64, causal), forward and
forward + backward: torch's scaled_dot_product_attention(is_causal=True) in fp16 and in fp32, the Triton path with its
launches skipped, and the aot path (csrc/attention_aot.cpp, attention_backward_aot.cpp) with its launches dropped,
with and without its short path (fasttrain/ops/attention.py _aot_short: the public function straight to one C++ op
with its autograd in C++, csrc/attention_aot_autograd.cpp): the host time of each path's Python, dispatch and launch
packing, not of any attention computed. SDPA computes on the CPU, so its rows include that compute: one token keeps
the arithmetic negligible, though the fp16 CPU kernels still convert to fp32 and back on every call, which a GPU does
not; the fp32 row is the closer measure of torch's host cost per call, and the ratio printed is against the faster
of the two.

    python tools/aot_host_ab.py --attention --rounds 11

It then times, the same way, flash_attn_qkvpacked_func's common call (qkv (1, 1, 3, 12, 64), causal) against SDPA on
qkv's views, with the backward also through Triton's JIT launcher (launches skipped) as the aot column's backward
runs where the C++ backward does not write into the packed gradient; scaled_dot_product_attention under a
boolean causal mask (a band: the kernels' own window) against torch's SDPA under the same mask; and
flash_attn_varlen_func over one packed sequence (q, k, v (1, 12, 64), causal) against SDPA on the rows' (1, H, T, D)
views, with and without its short path (_varlen_short). Its offsets are CPU tensors here, which both paths read on
every call (CUDA offsets the general path has checked are not read again: see fasttrain/ops/attention_checks.py
_known_longest), so the rows include that read; and flash_attn_func with dropout_p 0.1 (the seed drawn on every
call) against SDPA with the same dropout_p, with and without the short path.
"""

import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before fasttrain's kernels: the Triton path takes CPU tensors

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fasttrain.benchmarks import bench_overhead, common  # noqa: E402
from fasttrain.ops import norms, rotary  # noqa: E402

# op -> the module whose _AOT_OP its public function's short path calls (None: the general path)
# (fasttrain.ops.cross_entropy is the public function: its module by name)
SHORT_PATH = {"layer_norm": norms, "add_layer_norm": norms, "rms_norm": norms, "add_rms_norm": norms}
SHORT_PATH |= {"rotary": rotary, "cross_entropy": sys.modules["fasttrain.ops.cross_entropy"]}
OPS = tuple(op for op in bench_overhead.AOT_OPS if op != "decode")  # decode: --decode, at its own shape
OPS += ("rms_norm", "add_rms_norm")


def cases() -> dict:
    """bench_overhead.cases("cpu") and the RMSNorm cases on layer_norm's and add_layer_norm's inputs (eps None:
    the machine epsilon, torch's default and ours)."""
    all_cases = bench_overhead.cases("cpu")
    (x, w, _), (branch, stream, *_) = all_cases["layer_norm"][0], all_cases["add_layer_norm"][0]
    C = bench_overhead.C
    all_cases["rms_norm"] = ((x, w), lambda x, w: norms.rms_norm(x, (C,), w), lambda x, w: F.rms_norm(x, (C,), w))
    all_cases["add_rms_norm"] = (
        (branch, stream, w),
        lambda x, r, w: norms.add_rms_norm(x, r, (C,), w),
        lambda x, r, w: common.eager_add_norm(F.rms_norm)(x, r, (C,), w),
    )
    return all_cases


def per_call(run, calls: int) -> float:
    start = time.thread_time()
    for _ in range(calls):
        run()
    return (time.thread_time() - start) / calls * 1e6


def runner(fn, inputs, mode: str):
    if mode == "fwd+bwd":
        return bench_overhead.forward_backward(fn, inputs)

    def forward():
        with torch.no_grad():
            fn(*inputs)

    return forward


def decode(rounds: int, calls: int) -> None:
    from fasttrain.ops import decode as ops

    B, Tmax, H, D = 1, 512, 12, 64
    q = torch.randn(B, 1, H, D, dtype=torch.float16)
    k_cache, v_cache = torch.randn(B, Tmax, H, D, dtype=torch.float16), torch.randn(B, Tmax, H, D, dtype=torch.float16)
    k, v = torch.randn(B, 1, H, D, dtype=torch.float16), torch.randn(B, 1, H, D, dtype=torch.float16)
    lengths = torch.tensor([100], dtype=torch.int32)

    def call():
        ops.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, causal=True, check_lengths=False)

    def op():
        ops._AOT_OP(q, k_cache, v_cache, k, v, lengths, None, D**-0.5, ops.UNBOUNDED, 0, 0)

    # torch's static-cache step on a 1-row cache (position 0, every row filled): the docstring says why
    k_static, v_static = (torch.randn(B, H, 1, D, dtype=torch.float16) for _ in range(2))
    q_t, k_t, v_t = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, 1, D)
    position, filled = torch.zeros(1, dtype=torch.long), torch.ones(B, 1, 1, 1, dtype=torch.bool)

    def torch_step():
        k_static.index_copy_(2, position, k_t)
        v_static.index_copy_(2, position, v_t)
        F.scaled_dot_product_attention(q_t, k_static, v_static, attn_mask=filled)

    impls = ("torch, 1-row static cache", "aot without the short path, no launch", "aot, no launch")
    impls += ("the C++ op alone, no launch",)
    best = dict.fromkeys(impls, float("inf"))
    with torch.no_grad(), bench_overhead.aot_launches_dropped("cpu", {torch.float16}):
        for _ in range(rounds):
            best[impls[0]] = min(best[impls[0]], per_call(torch_step, calls))
            short, ops._AOT_OP = ops._AOT_OP, None
            try:
                best[impls[1]] = min(best[impls[1]], per_call(call, calls))
            finally:
                ops._AOT_OP = short
            best[impls[2]] = min(best[impls[2]], per_call(call, calls))
            best[impls[3]] = min(best[impls[3]], per_call(op, calls))
    times = "  ".join(f"{impl} {us:.1f}" for impl, us in best.items())
    print(f"decode fwd: {times} us per call (aot / torch {best[impls[2]] / best[impls[0]]:.2f}x)", flush=True)


def attention(rounds: int, calls: int) -> None:
    from fasttrain.ops import attention as ops
    from fasttrain.ops.attention import flash_attn_func

    B, T, H, D = 1, 1, 12, 64
    g = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(B, T, H, D, generator=g, dtype=torch.float16).requires_grad_() for _ in "qkv")
    inputs_fp32 = tuple(t.detach().float().requires_grad_() for t in inputs)

    def ours(q, k, v):
        return flash_attn_func(q, k, v, causal=True)

    def sdpa(q, k, v):  # (B, T, H, D) in and out, as flash_attn_func
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)

    modules = ("attention", "attention_backward")
    for mode in ("fwd", "fwd+bwd"):
        impls = ("torch sdpa fp16", "torch sdpa fp32", "triton, no launch")
        impls += ("aot without the short path, no launch", "aot, no launch")
        best = dict.fromkeys(impls, float("inf"))
        for _ in range(rounds):
            best[impls[0]] = min(best[impls[0]], per_call(runner(sdpa, inputs, mode), calls))
            best[impls[1]] = min(best[impls[1]], per_call(runner(sdpa, inputs_fp32, mode), calls))
            with bench_overhead.launches_skipped():
                best[impls[2]] = min(best[impls[2]], per_call(runner(ours, inputs, mode), calls))
            with bench_overhead.aot_launches_dropped("cpu", {torch.float16}, modules):
                short, ops._AOT_OP = ops._AOT_OP, None
                try:
                    best[impls[3]] = min(best[impls[3]], per_call(runner(ours, inputs, mode), calls))
                finally:
                    ops._AOT_OP = short
                best[impls[4]] = min(best[impls[4]], per_call(runner(ours, inputs, mode), calls))
        times = "  ".join(f"{impl} {us:.1f}" for impl, us in best.items())
        ratio = best[impls[4]] / min(best[impls[0]], best[impls[1]])
        print(f"attention {mode}: {times} us per call (aot / sdpa {ratio:.2f}x)", flush=True)


def _rows(name: str, fn, theirs, inputs, inputs_fp32, shorts: tuple, rounds: int, calls: int, jit_backward=()):
    """One line per mode: torch's fn in fp16 and fp32, then ours with the aot launches dropped: with jit_backward
    ((module, attribute, value) set inside) the backward through the JIT launcher, launches skipped; without the short
    paths (shorts: (module, attribute) set to None inside); and as it is."""
    impls = ("torch sdpa fp16", "torch sdpa fp32")
    impls += ("aot, JIT backward, no launch",) * bool(jit_backward)
    impls += ("aot without the short path, no launch", "aot, no launch")
    modules = ("attention", "attention_backward")

    def timed(impl, mode, patches=()):
        saved = [(m, a, getattr(m, a)) for m, a, _ in patches]
        for m, a, v in patches:
            setattr(m, a, v)
        try:
            best[impl] = min(best[impl], per_call(runner(fn, inputs, mode), calls))
        finally:
            for m, a, v in saved:
                setattr(m, a, v)

    off = tuple((m, a, None) for m, a in shorts)
    for mode in ("fwd", "fwd+bwd"):
        best = dict.fromkeys(impls, float("inf"))
        for _ in range(rounds):
            best[impls[0]] = min(best[impls[0]], per_call(runner(theirs, inputs, mode), calls))
            best[impls[1]] = min(best[impls[1]], per_call(runner(theirs, inputs_fp32, mode), calls))
            with bench_overhead.aot_launches_dropped("cpu", {torch.float16}, modules):
                if jit_backward:
                    with bench_overhead.launches_skipped():
                        timed(impls[2], mode, off + tuple(jit_backward))
                timed(impls[-2], mode, off)
                timed(impls[-1], mode)
        times = "  ".join(f"{impl} {us:.1f}" for impl, us in best.items())
        ratio = best[impls[-1]] / min(best[impls[0]], best[impls[1]])
        print(f"{name} {mode}: {times} us per call (aot / sdpa {ratio:.2f}x)", flush=True)


def packed_and_masked(rounds: int, calls: int) -> None:
    from fasttrain.ops import attention as ops
    from fasttrain.ops import attention_packed
    from fasttrain.ops.attention import scaled_dot_product_attention
    from fasttrain.ops.attention_packed import flash_attn_qkvpacked_func

    B, T, H, D = 1, 1, 12, 64
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, 3, H, D, generator=g, dtype=torch.float16).requires_grad_()

    def sdpa_packed(qkv):  # (B, T, 3, H, D) in, (B, T, H, D) out, as flash_attn_qkvpacked_func
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, T, D) views
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

    def ours_packed(qkv):
        return flash_attn_qkvpacked_func(qkv, causal=True)

    fp32 = (qkv.detach().float().requires_grad_(),)
    jit_backward = ((ops, "_AOT_BACKWARD_OP_REASON", "the JIT's backward"),)
    shorts = ((attention_packed, "_AOT_PACKED_OP"),)
    _rows("qkvpacked", ours_packed, sdpa_packed, (qkv,), fp32, shorts, rounds, calls, jit_backward)

    mask = torch.ones(T, T, dtype=torch.bool).tril()  # causal
    inputs = tuple(torch.randn(B, H, T, D, generator=g, dtype=torch.float16).requires_grad_() for _ in "qkv")
    fp32 = tuple(t.detach().float().requires_grad_() for t in inputs)

    def sdpa_masked(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def ours_masked(q, k, v):
        return scaled_dot_product_attention(q, k, v, attn_mask=mask)

    _rows("sdpa causal mask", ours_masked, sdpa_masked, inputs, fp32, ((ops, "_AOT_OP"),), rounds, calls)

    from fasttrain.ops.attention import flash_attn_func, flash_attn_varlen_func

    rows = tuple(torch.randn(T, H, D, generator=g, dtype=torch.float16).requires_grad_() for _ in "qkv")
    fp32 = tuple(t.detach().float().requires_grad_() for t in rows)
    cu = torch.tensor([0, T], dtype=torch.int32)

    def ours_varlen(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu, cu, T, T, causal=True)

    def sdpa_rows(q, k, v):  # (T, H, D) in and out, as flash_attn_varlen_func over one sequence
        q, k, v = (t[None].transpose(1, 2) for t in (q, k, v))  # (1, H, T, D) views
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)[0].transpose(0, 1)

    _rows("varlen", ours_varlen, sdpa_rows, rows, fp32, ((ops, "_AOT_VARLEN_OP"),), rounds, calls)

    dense = tuple(torch.randn(B, T, H, D, generator=g, dtype=torch.float16).requires_grad_() for _ in "qkv")
    fp32 = tuple(t.detach().float().requires_grad_() for t in dense)

    def ours_dropout(q, k, v):
        return flash_attn_func(q, k, v, 0.1, causal=True)

    def sdpa_dropout(q, k, v):  # (B, T, H, D) in and out, as flash_attn_func
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D) views
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True).transpose(1, 2)

    _rows("dropout", ours_dropout, sdpa_dropout, dense, fp32, ((ops, "_AOT_OP"),), rounds, calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=OPS)
    parser.add_argument("--decode", action="store_true", help="flash_attn_with_kvcache's aot path instead")
    parser.add_argument("--attention", action="store_true", help="flash_attn_func's common call instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.decode:
        return decode(args.rounds, args.calls)
    if args.attention:
        attention(args.rounds, args.calls)
        return packed_and_masked(args.rounds, args.calls)
    all_cases = cases()
    for name in args.ops:
        inputs, ours, theirs = all_cases[name]
        for mode in ("fwd", "fwd+bwd"):
            impls = ("torch", "triton, no launch", "aot without the short path, no launch", "aot, no launch")
            if name not in SHORT_PATH:
                impls = impls[:2] + impls[3:]
            best = dict.fromkeys(impls, float("inf"))
            for _ in range(args.rounds):
                best["torch"] = min(best["torch"], per_call(runner(theirs, inputs, mode), args.calls))
                with bench_overhead.launches_skipped():
                    us = per_call(runner(ours, inputs, mode), args.calls)
                best["triton, no launch"] = min(best["triton, no launch"], us)
                with bench_overhead.aot_launches_dropped("cpu", {torch.float32}):
                    if name in SHORT_PATH:
                        module = SHORT_PATH[name]
                        short, module._AOT_OP = module._AOT_OP, None
                        try:
                            us = per_call(runner(ours, inputs, mode), args.calls)
                        finally:
                            module._AOT_OP = short
                        best[impls[2]] = min(best[impls[2]], us)
                    us = per_call(runner(ours, inputs, mode), args.calls)
                best["aot, no launch"] = min(best["aot, no launch"], us)
            times = "  ".join(f"{impl} {us:.1f}" for impl, us in best.items())
            print(f"{name} {mode}: {times} us per call", flush=True)


if __name__ == "__main__":
    main()
