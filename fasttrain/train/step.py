"""The training step: forward and backward over train.grad_accum micro-batches, then the optimizer; eager, or
replayed as one CUDA graph (train.cuda_graph). And what a run's losses must be to go on."""

from __future__ import annotations

import math

import torch

from fasttrain.train.device import autocast_for
from fasttrain.train.graphed import GraphedStep
from fasttrain.train.run import Run


def forward_backward(model, micro_batches, device: torch.device, autocast, scaler) -> torch.Tensor:
    """Accumulate the gradient of the mean loss over equal-sized micro-batches; return that mean loss (detached)."""
    total = torch.zeros((), device=device)
    for x, y in micro_batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            _, loss = model(x, y)
        scaler.scale(loss / len(micro_batches)).backward()
        total += loss.detach()
    return total / len(micro_batches)


class TrainStep:
    """`step(i) -> (lr, mean loss as a device tensor)`: optimizer step i on the run's next micro-batches.

    With train.cuda_graph the step is captured at construction (a few warm-up steps that leave the weights and the
    optimizer's state as they were), so make one only when there are steps to take."""

    def __init__(self, run: Run):
        self.run = run
        tc = run.cfg.train
        self.graphed = None
        if tc.cuda_graph:
            self.graphed = GraphedStep(
                run.model,
                run.optimizer,
                tc.grad_accum,
                tc.batch_size,
                tc.seq_len,
                run.device,
                autocast_for(run.precision, run.device, cache_enabled=False),
            )

    def __call__(self, step: int) -> tuple[float, torch.Tensor]:
        run = self.run
        micro = [run.train_batches.next() for _ in range(run.cfg.train.grad_accum)]
        if self.graphed is not None:  # the grads live in the graph's pool: never set to None here
            lr = run.schedule(step)
            return lr, self.graphed.step(micro, lr)
        lr = run.schedule.apply(run.optimizer, step)
        loss = forward_backward(run.step_model, micro, run.device, run.autocast, run.scaler)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        return lr, loss


def check_losses(run: Run, losses: list[tuple[int, float]]) -> None:
    """Stop a diverged run: FloatingPointError at the first non-finite (step, loss). fp16 is exempt: its GradScaler
    skips such steps and lowers the scale."""
    bad = next(((step, loss) for step, loss in losses if not math.isfinite(loss)), None)
    if bad is not None and run.precision != "fp16":
        raise FloatingPointError(
            f"training loss became {bad[1]} at step {bad[0]}; lower optim.lr (now {run.cfg.optim.lr}) or set "
            f"optim.max_grad_norm"
        )
