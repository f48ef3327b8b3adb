"""Which warp-specialized tiles of the attention forward are right on this GPU, and how fast each is: every candidate
pinned alone in a child process of its own (a fault or a hang costs that tile's rows, not the run), on a few shapes,
against fp32 attention, beside v2's autotuned forward (the specialized configs off) on the same shapes.

    python tools/ws_tile_probe.py [--device cuda|cpu] [--out DIR]     # results in DIR/ws_tiles.json

Why: on an H200 (triton 3.6.0, 2026-12-04) the 128 x 64 tile at 3 stages gave NaN rows in 10 of the 12 GPU cases where
128 x 128 at 2 stages was right. The two differ in BLOCK_N and in stages, so the candidates cross them; 128 x 128 at 3
stages needs 246 KB of shared memory at d128, over sm_90's 227 (compiled ahead of time), so it runs at d64 only. A
tile is right when its error against fp32 is at most twice PyTorch's own in bf16 and no output is NaN; only then is
it timed. The run exits 1 only when v2 is not right. On a CPU (TRITON_INTERPRET=1) it runs one small shape per class
untimed: its own plumbing, checked by a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from fasttrain.benchmarks import common

CANDIDATES = {  # head-dim class -> (BLOCK_M, BLOCK_N, num_warps, num_stages): WARP_SPECIALIZE tiles, 12 warps each
    "d64": [(128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2), (128, 128, 4, 3)],
    "d128": [(128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2)],
}
V2 = "v2"  # the child that runs the autotuned forward with FASTTRAIN_ATTENTION_WS=0
CHILD_TIMEOUT_S = 180


def shapes(device: str) -> list[tuple]:
    """(B, T, H, Hkv, D, causal): GQA 4 causal, and the unmasked loop (FULL_TILES, non-causal whole tiles). On a GPU
    275 GFLOP each, ~0.6 ms at v2's rate on the H200: over twice the host's time per call (~0.25 ms for an attention
    forward there, Host time per op call), so the timing is the GPU's; the fp32 reference's (B, H, T, T) temporaries
    stay under 45 GB."""
    if device == "cpu":
        return [(1, 97, 2, 1, 64, True), (1, 128, 1, 1, 128, False)]
    return [(1, 8192, 32, 8, 64, True), (1, 8192, 16, 4, 128, True), (2, 4096, 16, 16, 128, False)]


def verdict(out: torch.Tensor, pytorch: torch.Tensor, ref: torch.Tensor) -> dict:
    """out and PyTorch's same-dtype output against the fp32 reference: right when out's error is at most twice
    PyTorch's (+1e-5) and no element is NaN; nan_rows counts the (b, t, h) rows holding one."""
    err = (out.double() - ref.double()).abs().max().item()
    bound = 2 * (pytorch.double() - ref.double()).abs().max().item() + 1e-5
    nan_rows = int(out.isnan().any(dim=-1).sum().item())
    return {"max_err": err, "bound": bound, "nan_rows": nan_rows, "right": nan_rows == 0 and err <= bound}


def same_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Eager PyTorch in q's dtype (scores, softmax and P V in bf16), the 2x rule's baseline: q (B, T, H, D), k and v
    (B, T, Hkv, D) -> (B, T, H, D)."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)  # (B, T, H, D)
    scores = torch.einsum("bthd,bshd->bhts", q * q.shape[-1] ** -0.5, k)  # (B, H, T, T)
    if causal:
        later = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)  # key after the query
        scores = scores.masked_fill(later, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


def child(tile: str, device: str) -> list[dict]:
    """The rows of one candidate ("BM,BN,W,S") or of V2, in this process."""
    from fasttrain.benchmarks.bench_attention import flops
    from fasttrain.kernels import _attention_configs, attention
    from fasttrain.ops import flash_attn_func

    pinned = None if tile == V2 else tuple(int(x) for x in tile.split(","))
    if pinned is not None:  # the autotuner over this one config, which it never benchmarks
        attention._attn_fwd = attention.autotuned(
            attention._attn_fwd_kernel, _attention_configs.one_config_table((*pinned, True))
        )
    rows = []
    for B, T, H, Hkv, D, causal in shapes(device):
        if pinned is not None and pinned[:4] not in CANDIDATES[f"d{D}"]:
            continue
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(B, T, H, D, generator=g, device=device).bfloat16()
        k, v = (torch.randn(B, T, Hkv, D, generator=g, device=device).bfloat16() for _ in range(2))
        with torch.no_grad():
            out = flash_attn_func(q, k, v, causal=causal, backend="triton")
            pytorch = same_dtype(q, k, v, causal)
            ref = flash_attn_func(q.float(), k.float(), v.float(), causal=causal, backend="reference")
        ran = attention._attn_fwd.best_config  # the config the autotuner launched: the pinned one, or v2's pick
        row = {
            "tile": tile,
            "B": B,
            "T": T,
            "H": H,
            "Hkv": Hkv,
            "D": D,
            "causal": causal,
            "ran": f"{ran.kwargs} w{ran.num_warps} s{ran.num_stages}",
            **verdict(out, pytorch, ref),
        }
        if row["right"] and device == "cuda":
            ms = common.time_ms(
                lambda q=q, k=k, v=v, causal=causal: flash_attn_func(q, k, v, causal=causal, backend="triton"), device
            )
            row.update(fwd_ms=ms, fwd_tflops=flops("fwd", B, H, T, D, causal) / (ms * 1e-3) / 1e12)
        rows.append(row)
    return rows


def run_child(tile: str, device: str) -> list[dict]:
    """child(tile) in a fresh process; a crash, a hang or unreadable output is one row that says so."""
    env = dict(os.environ, FASTTRAIN_ATTENTION_WS="0" if tile == V2 else "1")
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--child", tile, "--device", device],
            env=env,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return [{"tile": tile, "right": False, "failed": f"no answer in {CHILD_TIMEOUT_S} s"}]
    if done.returncode != 0:
        return [{"tile": tile, "right": False, "failed": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}]
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(sys.argv[2], sys.argv[4])))
        return
    args = common.parse_args(__doc__.splitlines()[0])
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    tiles = [V2] + sorted({",".join(map(str, t)) for ts in CANDIDATES.values() for t in ts})
    rows = []
    for tile in tiles:  # written after each child, so that a run cut short keeps the tiles it finished
        rows += run_child(tile, args.device)
        path = common.write_results("ws_tiles", args.device, rows, {}, args.out, args.quick)
    common.print_table(
        rows,
        [
            "tile",
            "B",
            "T",
            "H",
            "Hkv",
            "D",
            "causal",
            "max_err",
            "bound",
            "nan_rows",
            "right",
            "fwd_tflops",
            "ran",
            "failed",
        ],
    )
    print("wrote", path)
    if not all(r["right"] for r in rows if r["tile"] == V2):  # a tile may be wrong (that is what is asked); v2 not
        raise SystemExit("v2, the forward without the specialized tiles, was not right: see its rows")


if __name__ == "__main__":
    main()
