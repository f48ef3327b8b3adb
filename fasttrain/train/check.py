"""`fasttrain check`: the debugging aids every training run should pass, each with its numbers.

1. Initial loss: a freshly initialised model predicts near uniformly, so its loss on random tokens is near ln(vocab).
2. Overfit one batch: the model and optimizer must drive the loss on a single fixed batch near zero.
3. Gradient check: torch.autograd.gradcheck of the whole model (every parameter) in float64 against finite
   differences, on a tiny one-block config with the run's architecture options.
4. Kernel gradients: the same tiny model in float32 on the backends training uses, its gradients against float64's.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass

import torch

from fasttrain.model import GPT, GPTConfig
from fasttrain.optim import AdamW
from fasttrain.train.build import apply_finetune, param_groups
from fasttrain.train.config import RunConfig

INIT_TOLERANCE = 0.1
"""Initial loss passes within this fraction of ln(vocab)."""
OVERFIT_LOSS = 0.1
"""Overfitting passes once the batch's loss is below this."""
KERNEL_GRAD_TOLERANCE = 1e-4
"""Largest relative gradient error of the float32 backends against float64."""


@dataclass
class Check:
    name: str
    passed: bool | None
    """None: not judged (reported only)."""
    detail: str

    def line(self) -> str:
        status = "INFO" if self.passed is None else ("PASS" if self.passed else "FAIL")
        return f"{status}  {self.name}: {self.detail}"


def run_checks(cfg: RunConfig, steps: int = 200, lr: float = 3e-3, seed: int = 0) -> list[Check]:
    """The four checks on cfg's model (random, or cfg.init.from's weights), each with its numbers."""
    model_cfg = cfg.model if cfg.model.vocab_size is not None else dataclasses.replace(cfg.model, vocab_size=257)
    torch.manual_seed(seed)
    model = GPT(model_cfg)
    pretrained = cfg.init.from_ is not None
    if pretrained:
        from fasttrain.integrations.hf_checkpoint import load_weights

        load_weights(model, cfg.init.from_)
    return [
        initial_loss(model, pretrained, seed),
        overfit(model, cfg, steps, lr, seed),
        _quietly(gradcheck_model, model_cfg, seed),
        _quietly(kernel_gradients, model_cfg, seed),
    ]


def _quietly(check, *args) -> Check:
    # These checks run float64 models, which every op serves by its reference: the fallback notices would only say so.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="fasttrain: .* runs on the reference backend", category=RuntimeWarning
        )
        return check(*args)


def _batch(cfg: GPTConfig, B: int, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, min(T, cfg.max_seq_len) + 1), generator=g)


@torch.no_grad()
def initial_loss(model: GPT, pretrained: bool, seed: int) -> Check:
    V = model.config.vocab_size
    idx = _batch(model.config, 4, 64, seed)
    loss = model.eval()(idx[:, :-1], idx[:, 1:])[1].item()
    want, tol = math.log(V), INIT_TOLERANCE * math.log(V)
    detail = f"loss {loss:.4f} on random tokens vs ln({V}) = {want:.4f} (|diff| {abs(loss - want):.4f}"
    if pretrained:
        return Check("initial loss", None, detail + "; pretrained weights are not expected to be uniform)")
    return Check("initial loss", abs(loss - want) <= tol, detail + f", allowed {tol:.4f})")


def overfit(model: GPT, cfg: RunConfig, steps: int, lr: float, seed: int) -> Check:
    """A copy of model (with the run's LoRA and freezing) trained on one fixed batch of 2 x 32 random tokens."""
    model = copy.deepcopy(model).train()
    apply_finetune(model, cfg.finetune)
    opt = AdamW(param_groups(model, 0.0), lr=lr, weight_decay=0.0)
    idx = _batch(model.config, 2, 32, seed + 1)
    losses = []
    start = time.perf_counter()
    while len(losses) < steps and (not losses or losses[-1] >= OVERFIT_LOSS):
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    first, final, step = losses[0], losses[-1], len(losses)
    detail = (
        f"loss {first:.4f} -> {final:.4f} in {step} steps (lr {lr:g}; pass below {OVERFIT_LOSS}), "
        f"{time.perf_counter() - start:.1f}s"
    )
    return Check("overfit one batch", final < OVERFIT_LOSS, detail)


def _tiny(cfg: GPTConfig) -> GPTConfig:
    """cfg's architecture options on tiny dimensions (2 heads of 4, GQA kept where cfg has it, 7 tokens)."""
    kv = 1 if cfg.n_kv_head < cfg.n_head else 2
    return dataclasses.replace(
        cfg,
        n_layer=2,
        n_head=2,
        n_kv_head=kv,
        d_model=8,
        head_dim=4,
        d_ff=12,
        vocab_size=11,
        max_seq_len=8,
        dropout=0.0,
        sliding_window=None if cfg.sliding_window is None else 3,
        full_attention_layers=min(cfg.full_attention_layers, 1),
        rope_original_max_seq_len=4,
    )


def _functional(model: GPT, idx: torch.Tensor):
    names = [n for n, _ in model.named_parameters()]

    def logits(*params):
        return torch.func.functional_call(model, dict(zip(names, params)), (idx,))[0]

    return logits, [p.detach().clone().requires_grad_() for _, p in model.named_parameters()]


def gradcheck_model(cfg: GPTConfig, seed: int) -> Check:
    torch.manual_seed(seed)
    tiny = dataclasses.replace(_tiny(cfg), n_layer=1)
    model = GPT(tiny).double().eval()
    with torch.no_grad():  # weights of order one, so every path's gradient is far above the finite-difference noise
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    idx = _batch(tiny, 1, 7, seed)[:, :-1]
    fn, params = _functional(model, idx)
    start = time.perf_counter()
    try:
        ok = torch.autograd.gradcheck(fn, params, fast_mode=True)
        why = ""
    except RuntimeError as e:  # gradcheck raises with the mismatching Jacobian
        ok, why = False, "; " + str(e).splitlines()[0][:160]
    n = sum(p.numel() for p in params)
    detail = f"{n} float64 parameters of a tiny {tiny.n_layer}-layer model, {time.perf_counter() - start:.1f}s{why}"
    return Check("gradcheck (float64)", ok, detail)


def kernel_gradients(cfg: GPTConfig, seed: int) -> Check:
    torch.manual_seed(seed)
    tiny = dataclasses.replace(_tiny(cfg), d_model=32, head_dim=16, d_ff=48, vocab_size=61, max_seq_len=64)
    model = GPT(tiny).eval()
    idx = _batch(tiny, 2, 37, seed)
    ref = copy.deepcopy(model).double()
    grads = []
    for m in (model, ref):
        loss = m(idx[:, :-1], idx[:, 1:])[1]
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    err = max(((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in zip(*grads))
    detail = f"largest relative error of float32 gradients vs float64 {err:.2e} (pass below {KERNEL_GRAD_TOLERANCE:g})"
    return Check("kernel gradients (float32)", err < KERNEL_GRAD_TOLERANCE, detail)
