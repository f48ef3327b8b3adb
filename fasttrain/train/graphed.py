"""`GraphedStep`: one optimizer step (forward and backward over the micro-batches, then AdamW) as a CUDA graph.

Why: replayed, the step costs the host one launch where eager mode makes hundreds, each through Triton's launcher
and the driver; where those launches take longer than the kernels, the eager GPU waits on the host
(benchmarks/NOTES.md, Training step, has the numbers).

The recipe is torch.cuda.graph's whole-network capture: a few warm-up steps on a side stream (the autotuners pick
their tiles, AdamW makes its state, the allocator settles), grads set to None so that the capture allocates them
in its own pool, at addresses every replay rewrites; then each step copies its batch into static input buffers,
writes the learning rate into a device tensor AdamW reads, and replays. The warm-up (warm_up) leaves the weights and
the optimizer's state as they were, so the first replay is the run's next step. The autocast given should have
its weight cache off (device.autocast_for(..., cache_enabled=False)): cached casts would not outlive the capture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

WARMUP_STEPS = 3


def warm_up(optimizer, one_step: Callable[[], torch.Tensor], steps: int) -> None:
    """`steps` calls of one_step() (forward, backward, optimizer.step) after grads set to None, at lr 0, then the
    optimizer's state as it was: each tensor copied back, or zeroed where the warm-up made it (AdamW's fresh state is
    zeros, step 0 included). The weights do not move at lr 0: decoupled decay multiplies them by 1 - lr * wd."""
    saved = {p: {k: v.clone() for k, v in state.items() if torch.is_tensor(v)} for p, state in optimizer.state.items()}
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        one_step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for p, state in optimizer.state.items():
        for k, v in state.items():
            before = saved.get(p, {}).get(k)
            if before is not None:
                v.copy_(before)
            elif torch.is_tensor(v):
                v.zero_()


class GraphedStep:
    """Capture at construction; `step(micro_batches, lr) -> mean loss` replays.

    model: in train mode, on CUDA, not compiled. optimizer: fasttrain.optim.AdamW (its step reads a CUDA tensor lr
    on the device and never synchronizes). micro_batches: grad_accum (x, y) pairs of (batch_size, seq_len) int64.
    What is CUDA's sits in _capture and _replay; the rest (buffers, the device lr, the accumulation) is plain torch.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer,
        grad_accum: int,
        batch_size: int,
        seq_len: int,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ):
        self.x = torch.zeros((grad_accum, batch_size, seq_len), dtype=torch.int64, device=device)
        self.y = torch.zeros_like(self.x)
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        for group in optimizer.param_groups:
            group["lr"] = self.lr  # read by AdamW's kernel on the device at each replay

        def one_step() -> torch.Tensor:
            total = torch.zeros((), device=device)
            for i in range(grad_accum):
                with autocast():
                    _, loss = model(self.x[i], self.y[i])
                (loss / grad_accum).backward()
                total += loss.detach()
            optimizer.step()
            return total / grad_accum

        self.loss = self._capture(one_step, optimizer, device)

    def _capture(self, one_step: Callable[[], torch.Tensor], optimizer, device: torch.device) -> torch.Tensor:
        """Warm up on a side stream, then record one_step() as self.graph; returns the loss tensor it writes."""
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA device, got {device}")
        rng = torch.cuda.get_rng_state(device)  # the warm-up's dropout draws are not the run's
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            warm_up(optimizer, one_step, WARMUP_STEPS)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.set_rng_state(rng, device)
        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loss = one_step()
        return loss

    def _replay(self) -> None:
        self.graph.replay()

    def step(self, micro_batches, lr: float) -> torch.Tensor:
        """One optimizer step on these micro-batches at this lr; the mean loss, a device tensor of its own."""
        for i, (x, y) in enumerate(micro_batches):
            self.x[i].copy_(x, non_blocking=True)
            self.y[i].copy_(y, non_blocking=True)
        self.lr.fill_(lr)
        self._replay()
        return self.loss.clone()
