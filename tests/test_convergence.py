"""Convergence tier (docs/conventions.md): a tiny GPT with every op on its fast backend against every op on `reference`.

Fast means attention and cross-entropy on `triton` (under TRITON_INTERPRET=1 on a CPU, which tests/conftest.py sets)
and AdamW on `cpu` (the C++ kernel) or `cuda`. Both runs start from the same init and see the same batches, so any
divergence beyond fp32 rounding is a bug in a kernel's forward, backward or update that per-op tests missed.
"""

import contextlib
import functools
import math

import pytest
import torch

from fasttrain.model import GPT, GPTConfig
from fasttrain.ops import cross_entropy, flash_attn_func
from fasttrain.optim import AdamW

# head_dim 32 (d_model / n_head), the smallest the Triton kernels take. The interpreter's cost is per program
# (docs/platform.md): B2 H2 T64 (one 64x64 tile) measured ~0.2 s per launch, and a step launches 4 kernels per layer
# (forward; backward's preprocess, dK/dV and dQ). At B1 and 2 layers a whole 8-step fast run measured 2.7-3.9 s.
TINY = dict(n_layer=2, n_head=2, d_model=64, vocab_size=96, max_seq_len=64)
B, T, STEPS, LR = 1, 64, 8, 3e-3

# fp32 tolerances. The two runs differ only in summation order (the kernel's online softmax over key tiles, the C++
# AdamW's fused update), ~1e-7 relative per element. Measured over 8 steps, B1 T64: largest loss gap 1.7e-6 on
# losses ~4, largest first-step gradient difference 3.7e-8 (GQA case). Adam divides by sqrt(v), so it spreads that
# rounding into the weights at about its own size and the loss gap stays near fp32 epsilon. The same division hides
# small gradient bugs from the loss curve (a 1% error in dK moved the loss by only 2e-6 over 8 steps, but the
# first-step gradients by 3e-6), so the gradients are checked too. 1e-4 on the loss and 1e-6 on the gradients leave
# 25-50x headroom over rounding; a 1% error in the softmax scale broke both (loss 2.6e-4, gradients 4.9e-6), and a
# dropped causal mask broke both by > 1e-2.
LOSS_ATOL = 1e-4
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


def _batches(vocab: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS batches of a learnable stream: each row counts up by one mod vocab from a random start, so the next
    token is a fixed function of the current one and the loss must fall within a few steps."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        start = torch.randint(0, vocab, (B, 1), generator=gen)
        seq = (start + torch.arange(T + 1)) % vocab  # (B, T + 1)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def _train(
    cfg: GPTConfig, ops: str, adamw: str, batches, device: str = "cpu", autocast: torch.dtype | None = None
) -> tuple[list[float], dict]:
    """Losses over len(batches) steps, and the first step's gradients by parameter name."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    for block in model.blocks:
        # A named backend raises rather than falls back, so a run here really went through the chosen kernels.
        block.attn.attn_fn = functools.partial(flash_attn_func, backend=ops)
    model.loss_fn = functools.partial(cross_entropy, backend=ops)
    opt = AdamW(model.parameters(), lr=LR, weight_decay=0.1, max_grad_norm=1.0, backend=adamw)
    losses, first_grads = [], {}
    for idx, targets in batches:
        with torch.autocast(device, dtype=autocast) if autocast is not None else contextlib.nullcontext():
            _, loss = model(idx.to(device), targets.to(device))
        loss.backward()
        if not first_grads:
            first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, first_grads


def _assert_learns(losses: list[float], vocab: int) -> None:
    # From ~ln(V) at init to clearly lower after STEPS updates (measured: 4.58 -> 3.54 and 4.62 -> 3.39).
    assert abs(losses[0] - math.log(vocab)) < 0.5, losses
    assert losses[-1] < losses[0] - 0.5, f"loss did not fall: {losses}"


def _check_agree(cfg: GPTConfig) -> None:
    batches = _batches(cfg.vocab_size)
    fast, fast_grads = _train(cfg, "triton", "cpu", batches)
    ref, ref_grads = _train(cfg, "reference", "reference", batches)
    for name, g in ref_grads.items():
        torch.testing.assert_close(
            fast_grads[name], g, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=lambda m, name=name: f"{name}: {m}"
        )
    gaps = [abs(a - b) for a, b in zip(fast, ref)]
    assert max(gaps) < LOSS_ATOL, f"loss curves diverge: fast {fast} reference {ref}"
    _assert_learns(ref, cfg.vocab_size)


GQA_ROTARY = dict(TINY, n_head=4, d_model=128, n_kv_head=1, positions="rotary", norm="rmsnorm", activation="swiglu")


def test_fast_and_reference_losses_agree():
    _check_agree(GPTConfig(**TINY, positions="learned"))


def test_fast_and_reference_agree_with_gqa_and_rotary():
    # 4 query heads over 1 k/v head (GQA ratio 4), rotary positions, RMSNorm and SwiGLU: the other paths of the block.
    _check_agree(GPTConfig(**GQA_ROTARY))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [dict(TINY, positions="learned"), GQA_ROTARY], ids=["mha_learned", "gqa_rotary"])
def test_fast_and_reference_agree_on_cuda_in_bf16(variant):
    # The CUDA kernels take fp16/bf16 only, so the fast run trains under bf16 autocast with the CUDA AdamW. Judged
    # by docs/conventions.md's rule: its loss curve may stray from the fp32 reference by at most 2x as far as the
    # reference ops' own bf16-autocast curve does.
    cfg = GPTConfig(**variant)
    batches = _batches(cfg.vocab_size)
    fast, _ = _train(cfg, "triton", "cuda", batches, "cuda", torch.bfloat16)
    ref_bf16, _ = _train(cfg, "reference", "reference", batches, "cuda", torch.bfloat16)
    ref_fp32, _ = _train(cfg, "reference", "reference", batches, "cuda")
    fast_gap = max(abs(a - b) for a, b in zip(fast, ref_fp32))
    bf16_gap = max(abs(a - b) for a, b in zip(ref_bf16, ref_fp32))
    assert fast_gap <= 2 * bf16_gap, f"fast {fast} bf16 reference {ref_bf16} fp32 reference {ref_fp32}"
    _assert_learns(fast, cfg.vocab_size)
