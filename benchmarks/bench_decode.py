"""KV-cache decode: fasttrain's split-KV kernel vs eager (cache grown by torch.cat + SDPA) and SDPA over a static
cache, and the same cache as shuffled pages of 256 rows (block_table), then end-to-end greedy generation vs an eager
loop.

    python -m fasttrain.benchmarks.bench_decode --device cuda  # Triton, d128: batch 1..64 x context 1k..32k
    python -m fasttrain.benchmarks.bench_decode --device cpu   # C++, d64: batch 1, 8 x context 1k, 4k

Heads: GQA 32/8, and MHA (32 heads on CUDA, 12 on the CPU).

Bytes (docs/benchmarks.md): the K and V cache bytes read, 2 * B * L * Hkv * D * element size; GB/s is reported with its
percentage of the copy bandwidth measured in the same run. Every implementation is checked against fasttrain's output
before it is timed. One decode step appends one token per sequence, at the same row each call, so timed calls repeat
identical work. On the CPU the implementations are timed in alternation (common.time_interleaved_ms) and the
reference (fp32 einsum over the whole cache, K/V repeated over the GQA group) joins them.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from fasttrain.benchmarks import common
from fasttrain.generate import generate
from fasttrain.model import GPT, GPTConfig
from fasttrain.ops import flash_attn_with_kvcache

# Inputs smaller than 4x the last cache level are rotated so that reads come from memory: an H100's L2 (50 MB), the
# L3 of the EPYC CPUs the CPU results come from (32 MiB).
LAST_CACHE_BYTES = {"cuda": 50 << 20, "cpu": 32 << 20}
MAX_CACHE_BYTES = (
    12 << 30
)  # K + V per shape; the eager baseline holds a second, concatenated copy, the paged row a third
PAGE = 256  # rows per page of the paged-cache row (flash-attn's kernels take multiples of 256)


def _rotating(make, nbytes: int, dev: str):
    """Copies of the inputs, enough to exceed 4x the last cache level, handed out in turn."""
    copies = [make() for _ in range(max(1, -(-4 * LAST_CACHE_BYTES[dev] // max(nbytes, 1))))]
    state = {"i": 0}

    def next_inputs():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]

    return next_inputs


def _eager_cat(q, k_past, v_past, k, v):
    """The user's starting point: cache as (B, Hkv, T, D) grown by torch.cat every step, then SDPA."""
    k_all = torch.cat([k_past, k.transpose(1, 2)], dim=2)  # (B, Hkv, L, D)
    v_all = torch.cat([v_past, v.transpose(1, 2)], dim=2)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k_all, v_all, enable_gqa=True).transpose(1, 2)


def _sdpa_static(q, kc, vc, k, v, L):
    """A static (B, Hkv, Tmax, D) cache written in place, SDPA over its first L rows (equal lengths: no mask)."""
    kc[:, :, L - 1 : L] = k.transpose(1, 2)
    vc[:, :, L - 1 : L] = v.transpose(1, 2)
    return F.scaled_dot_product_attention(q.transpose(1, 2), kc[:, :, :L], vc[:, :, :L], enable_gqa=True).transpose(
        1, 2
    )


def bench_kernel(dev, B, L, H, Hkv, D, dtype, copy_gbs):
    kv_bytes = 2 * B * L * Hkv * D * torch.finfo(dtype).bits // 8
    Tmax = -(-L // 256) * 256

    def make():
        return dict(
            q=torch.randn(B, 1, H, D, device=dev, dtype=dtype),
            k=torch.randn(B, 1, Hkv, D, device=dev, dtype=dtype),
            v=torch.randn(B, 1, Hkv, D, device=dev, dtype=dtype),
            kc=torch.randn(B, Tmax, Hkv, D, device=dev, dtype=dtype),
            vc=torch.randn(B, Tmax, Hkv, D, device=dev, dtype=dtype),
            seqlens=torch.full((B,), L - 1, dtype=torch.int32, device=dev),
        )

    inputs = _rotating(make, kv_bytes, dev)
    backend = "triton" if dev == "cuda" else "cpu"

    def ours(x):
        return flash_attn_with_kvcache(
            x["q"], x["kc"], x["vc"], x["k"], x["v"], cache_seqlens=x["seqlens"], check_lengths=False, backend=backend
        )

    paged = {}  # the same rows as pages of PAGE rows in a shuffled pool, and each sequence's block table

    def ours_paged(x):
        if id(x) not in paged:
            n = Tmax // PAGE
            where = torch.randperm(B * n, device=dev)
            pools = []
            for c in ("kc", "vc"):
                pool = torch.empty(B * n, PAGE, Hkv, D, device=dev, dtype=dtype)
                pool[where] = x[c].reshape(B * n, PAGE, Hkv, D)  # (B, Tmax, ...) -> (B * n pages, PAGE, ...)
                pools.append(pool)
            paged[id(x)] = (*pools, where.view(B, n).to(torch.int32))
        pool_k, pool_v, table = paged[id(x)]
        return flash_attn_with_kvcache(
            x["q"], pool_k, pool_v, x["k"], x["v"], cache_seqlens=x["seqlens"], block_table=table,
            check_lengths=False, backend=backend,
        )  # fmt: skip

    impls = {"fasttrain": ours, "fasttrain_paged": ours_paged}
    if dev == "cpu":
        impls["reference"] = lambda x: flash_attn_with_kvcache(
            x["q"], x["kc"], x["vc"], x["k"], x["v"], cache_seqlens=x["seqlens"], backend="reference"
        )
    past = {}  # the eager baseline's own (B, Hkv, L - 1, D) caches, made from the same rows

    def eager(x):
        if id(x) not in past:
            past[id(x)] = tuple(x[c][:, : L - 1].transpose(1, 2).contiguous() for c in ("kc", "vc"))
        return _eager_cat(x["q"], *past[id(x)], x["k"], x["v"])

    static = {}

    def sdpa(x):
        if id(x) not in static:
            static[id(x)] = (x["kc"].transpose(1, 2).contiguous(), x["vc"].transpose(1, 2).contiguous())
        return _sdpa_static(x["q"], *static[id(x)], x["k"], x["v"], L)

    impls.update(eager_cat=eager, sdpa_static=sdpa)

    x = inputs()
    want = ours(x).float()
    for name, fn in impls.items():
        err = (fn(x).float() - want).abs().max().item()
        if err > (1e-4 if dtype == torch.float32 else 3e-2):
            raise AssertionError(f"{name} disagrees with fasttrain by {err} at B={B} L={L} H={H}/{Hkv}")
    calls = {name: (lambda fn=fn: fn(inputs())) for name, fn in impls.items()}
    times = (
        common.time_interleaved_ms(calls, dev)
        if dev == "cpu"
        else {name: common.time_ms(call, dev) for name, call in calls.items()}
    )
    rows = []
    for name, ms in times.items():
        gbs = kv_bytes / (ms * 1e-3) / 1e9
        rows.append(
            dict(kind="decode", B=B, L=L, H=H, Hkv=Hkv, D=D, impl=name, ms=ms, GBs=gbs, pct_copy=100 * gbs / copy_gbs)
        )
    base = {r["impl"]: r["ms"] for r in rows}
    for r in rows:
        r["x_eager"] = base["eager_cat"] / r["ms"]
        r["x_sdpa"] = base["sdpa_static"] / r["ms"]
        r["x_contiguous"] = base["fasttrain"] / r["ms"]  # the paged row: its speed against the contiguous cache
    return rows


class CatCache:
    """The eager generation loop's cache (HF's dynamic cache): each layer's K/V grown by torch.cat every step.
    Same hand-off as fasttrain.generate.KVCache; equal-length prompts only (no per-sequence lengths)."""

    def __init__(self, n_layer):
        self.k, self.v, self.length, self.n_layer = [None] * n_layer, [None] * n_layer, 0, n_layer

    def positions(self, T):
        return (self.length + torch.arange(T, device=self.device))[None].expand(self.batch, T)  # (B, T)

    def attend(self, i, q, k, v):
        T = q.shape[1]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D)
        self.k[i] = k if self.k[i] is None else torch.cat([self.k[i], k], dim=2)
        self.v[i] = v if self.v[i] is None else torch.cat([self.v[i], v], dim=2)
        if i == self.n_layer - 1:
            self.length += T
        out = F.scaled_dot_product_attention(q.transpose(1, 2), self.k[i], self.v[i], is_causal=T > 1, enable_gqa=True)
        return out.transpose(1, 2)  # (B, T, H, D)


@torch.inference_mode()
def eager_generate(model, prompts, max_new_tokens):
    """Greedy, prefill then one token at a time through CatCache; returns (tokens, seconds)."""
    dev = next(model.parameters()).device
    idx = torch.tensor(prompts, device=dev)  # (B, T)
    cache = CatCache(model.config.n_layer)
    cache.batch, cache.device = idx.shape[0], dev
    start = time.perf_counter()
    out = []
    for _ in range(max_new_tokens):
        logits, _ = model(idx, cache=cache)
        idx = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(idx[:, 0].tolist())  # a host sync per token, as in fasttrain.generate
    return [list(t) for t in zip(*out)], time.perf_counter() - start


def bench_generate(dev, cfg: GPTConfig, B, prompt_len, new, dtype, label):
    torch.manual_seed(0)
    model = GPT(cfg).to(dev, dtype).eval()
    prompts = torch.randint(0, cfg.vocab_size, (B, prompt_len)).tolist()
    rows = []
    for name, run in [
        ("eager_loop", None),
        ("fasttrain", {"cuda_graph": False}),
        ("fasttrain_graph", {"cuda_graph": True}),
    ]:
        if name == "fasttrain_graph" and dev != "cuda":
            continue
        for _ in range(2):  # the first run warms up autotuning and allocations
            if run is None:
                tokens, seconds = eager_generate(model, prompts, new)
            else:
                result = generate(model, prompts, new, temperature=0.0, **run)
                tokens, seconds = result.tokens, result.prefill_s + result.decode_s
        rows.append(
            dict(
                kind="generate",
                model=label,
                B=B,
                prompt=prompt_len,
                new=new,
                impl=name,
                tokens_per_s=B * new / seconds,
                tokens=tokens,
            )
        )
    # Greedy paths of a random model meet near-ties that rounding breaks either way: agreement is reported, not
    # asserted (the kernels themselves are checked above and in tests/test_generate.py).
    eager_tps, eager_tokens = rows[0]["tokens_per_s"], rows[0]["tokens"]
    for r in rows:
        r["x_eager"] = r["tokens_per_s"] / eager_tps
        r["same_as_eager"] = sum(a == b for a, b in zip(r.pop("tokens"), eager_tokens)) / B
    return rows


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    dev = args.device
    copy_gbs = common.copy_bandwidth_gbs(dev)
    if dev == "cuda":
        dtype, D = torch.bfloat16, 128
        batches, contexts, heads = (1, 4, 16, 64), (1024, 4096, 16384, 32768), ((32, 8), (32, 32))
        gen = [
            (GPTConfig(n_layer=12, n_head=12, d_model=768, vocab_size=50304, max_seq_len=2048), "gpt2-small"),
        ]
        gen_shapes = [(1, 128, 256), (16, 128, 256)]
    else:
        dtype, D = torch.float32, 64
        batches, contexts, heads = (1, 8), (1024, 4096), ((32, 8), (12, 12))
        gen = [
            (GPTConfig(n_layer=4, n_head=8, n_kv_head=2, d_model=512, vocab_size=8192, max_seq_len=2048), "4x512-gqa")
        ]
        gen_shapes = [(1, 1024, 32), (8, 512, 32)]
    rows = []
    for H, Hkv in heads:
        for B in batches:
            for L in contexts:
                if 2 * B * L * Hkv * D * torch.finfo(dtype).bits // 8 > MAX_CACHE_BYTES:
                    print(f"skip B={B} L={L} H={H}/{Hkv}: K+V over {MAX_CACHE_BYTES >> 30} GiB")
                    continue
                rows += bench_kernel(dev, B, L, H, Hkv, D, dtype, copy_gbs)
                if args.quick:
                    break
    common.print_table(
        [r for r in rows if r["kind"] == "decode"],
        ["B", "L", "H", "Hkv", "impl", "ms", "GBs", "pct_copy", "x_eager", "x_sdpa", "x_contiguous"],
    )
    for cfg, label in gen:
        for B, prompt_len, new in gen_shapes:
            rows += bench_generate(dev, cfg, B, prompt_len, new, dtype, label)
    common.print_table(
        [r for r in rows if r["kind"] == "generate"],
        ["model", "B", "prompt", "new", "impl", "tokens_per_s", "x_eager", "same_as_eager"],
    )
    path = common.write_results("decode", dev, rows, {"copy_GBs": copy_gbs}, args.out, args.quick)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s; results in {path}")


if __name__ == "__main__":
    main()
