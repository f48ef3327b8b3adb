"""A Llama-shaped transformers model (random weights) with attn_implementation "fasttrain" against "sdpa" and
"eager", side by side: forward + backward of a padded batch (rows left-padded by 0 to 3/8 of T) and of an unpadded
one, and one greedy decode step against a prefilled cache (dynamic and static, the same padded batch); then the two
kernels that can serve an unpadded 1-token decode step, flash_attn_func (causal, bottom-right) and
flash_attn_with_kvcache, on the cache layout transformers hands the attention function. Needs transformers
(`pip install "fasttrain[hf]"`).

    python -m fasttrain.benchmarks.bench_hf_attention [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import inspect

import torch

from fasttrain.benchmarks import common

IMPLS = ("eager", "sdpa", "fasttrain")
# (layers, hidden, heads, kv heads, B, T): head_dim 64, GQA 4:1 or 2:1; narrow and long, so that attention is a
# large share of the step; a small vocabulary for the same reason.
SHAPES = {"cuda": (8, 1024, 16, 4, 8, 2048), "cpu": (4, 256, 4, 1, 4, 1024)}
QUICK = {"cuda": (2, 512, 8, 2, 4, 512), "cpu": (2, 128, 2, 1, 2, 512)}
VOCAB = 512
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}
# 1-token decode kernels: (B, H, Hkv, D, cached keys)
DECODE = {"cuda": [(1, 32, 8, 128, 4096), (16, 32, 8, 128, 1024)], "cpu": [(1, 32, 8, 128, 1024), (4, 8, 2, 64, 256)]}


def build(device: str, dtype, layers: int, hidden: int, heads: int, kv_heads: int, T: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    import fasttrain.integrations.hf  # noqa: F401  (registers "fasttrain")

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2 * T,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def padded_batch(B: int, T: int, device: str):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, : (3 * T * b) // (8 * max(B - 1, 1))] = 0  # left padding: 0 .. 3/8 of T
    return ids, mask.to(device)


def train_step(model, impl: str, ids, mask):
    def step():
        model.set_attn_implementation(impl)
        model.zero_grad(set_to_none=True)
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
        model(ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()

    return step


def check_logits(model, ids, mask) -> float:
    """fasttrain's logits against eager's on the real tokens, relative to eager's largest."""
    with torch.no_grad():
        got = {}
        for impl in ("fasttrain", "eager"):
            model.set_attn_implementation(impl)
            got[impl] = model(ids, attention_mask=mask, use_cache=False).logits.float()
    real = mask.bool()
    err = ((got["fasttrain"] - got["eager"])[real].abs().max() / got["eager"][real].abs().max()).item()
    if not err < (2e-2 if ids.is_cuda else 1e-5):
        raise AssertionError(f"fasttrain's logits differ from eager's by {err:.3g}")
    return err


def decode_step(model, impl: str, ids, mask, cache_kind: str):
    """One new token for each row against a cache prefilled with ids (the cache is cut back after each step)."""
    from transformers import DynamicCache, StaticCache

    B, T = ids.shape
    model.set_attn_implementation(impl)
    cache = (
        DynamicCache(config=model.config)
        if cache_kind == "dynamic"
        else StaticCache(config=model.config, max_cache_len=T + 8)
    )
    # transformers 5 names the argument `cache`; 4.x `past_key_values`
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(ids, attention_mask=mask, **{kw: cache})
    new = ids[:, -1:]
    step_mask = torch.cat((mask, mask.new_ones(B, 1)), 1)
    position = torch.tensor([T], device=ids.device)

    def step():
        model.set_attn_implementation(impl)
        with torch.no_grad():
            model(new, attention_mask=step_mask, cache_position=position, **{kw: cache})
        cache.crop(-1)

    return step


def decode_kernels(device: str, dtype) -> list[dict]:
    from fasttrain.ops import flash_attn_func, flash_attn_with_kvcache

    rows = []
    for B, H, Hkv, D, Tk in DECODE[device]:
        g = torch.Generator(device=device).manual_seed(0)
        # transformers' layout: (B, H, T, D) tensors, handed over as (B, T, H, D) views
        q = torch.randn(B, H, 1, D, generator=g, device=device, dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(B, Hkv, Tk, D, generator=g, device=device, dtype=dtype).transpose(1, 2) for _ in "kv")
        lengths = torch.full((B,), Tk, dtype=torch.int32, device=device)
        calls = {
            "flash_attn_func": lambda q=q, k=k, v=v: flash_attn_func(q, k, v, causal=True),
            "flash_attn_with_kvcache": lambda q=q, k=k, v=v, n=lengths: flash_attn_with_kvcache(
                q, k, v, cache_seqlens=n, causal=True
            ),
        }
        torch.testing.assert_close(calls["flash_attn_func"](), calls["flash_attn_with_kvcache"](), atol=2e-2, rtol=0)
        times = common.time_interleaved_ms(calls, device)
        rows += [dict(part="decode kernel", B=B, H=H, Hkv=Hkv, D=D, Tk=Tk, impl=n, ms=t) for n, t in times.items()]
    return rows


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    device, dtype = args.device, DTYPE[args.device]
    layers, hidden, heads, kv_heads, B, T = (QUICK if args.quick else SHAPES)[device]
    model = build(device, dtype, layers, hidden, heads, kv_heads, T)
    ids, mask = padded_batch(B, T, device)
    err = check_logits(model, ids, mask)
    shape = dict(layers=layers, hidden=hidden, heads=f"{heads}/{kv_heads}", B=B, T=T)
    rows = []
    for part, step_mask in (("fwd+bwd, padded", mask), ("fwd+bwd, unpadded", None)):
        times = common.time_interleaved_ms({impl: train_step(model, impl, ids, step_mask) for impl in IMPLS}, device)
        rows += [dict(part=part, **shape, impl=impl, ms=t) for impl, t in times.items()]
        print(f"{part} done", flush=True)
    for cache_kind in ("dynamic", "static"):
        steps = {impl: decode_step(model, impl, ids, mask, cache_kind) for impl in IMPLS}
        times = common.time_interleaved_ms(steps, device)
        rows += [dict(part=f"decode step, {cache_kind} cache", **shape, impl=i, ms=t) for i, t in times.items()]
        print(f"decode, {cache_kind} cache done", flush=True)
    for r in rows:
        r["x eager"] = next(o["ms"] for o in rows if o["part"] == r["part"] and o["impl"] == "eager") / r["ms"]
    common.print_table(rows, ["part", "B", "T", "impl", "ms", "x eager"])
    kernel_rows = decode_kernels(device, dtype)
    common.print_table(kernel_rows, ["part", "B", "H", "Hkv", "D", "Tk", "impl", "ms"])
    ceilings = {"fasttrain_vs_eager_logits_rel_err": err}
    path = common.write_results("hf_attention", device, rows + kernel_rows, ceilings, args.out, args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
