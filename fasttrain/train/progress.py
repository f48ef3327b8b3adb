"""A run's voice while it trains: the progress bar, TensorBoard, and the step losses moved from the device into the
metrics once per log interval (one device sync per interval, not one per step)."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from fasttrain.model import flops_per_token
from fasttrain.train.device import peak_flops
from fasttrain.train.run import Run


class Progress:
    def __init__(self, run: Run):
        tc = run.cfg.train
        self.run = run
        bar_off = not tc.progress_bar or not run.job.is_main
        self.bar = tqdm(total=tc.steps, initial=run.start, disable=bar_off, dynamic_ncols=True, unit="step")
        # The job's tokens, and the peak of all its devices: tokens/s and MFU are the job's.
        self.tokens_per_step = tc.batch_size * tc.grad_accum * tc.seq_len * run.job.world_size
        self.flops, self.peak = flops_per_token(run.cfg.model, tc.seq_len), peak_flops(run.device, run.precision)
        if self.peak is not None:
            self.peak *= run.job.world_size
        # (step, lr, epoch, loss and non-finite flag on the device)
        self.pending: list[tuple[int, float, float, torch.Tensor, torch.Tensor]] = []
        self.restart_clock()

    def record(self, step: int, lr: float, epoch: float, loss: torch.Tensor, bad: torch.Tensor) -> None:
        self.pending.append((step, lr, epoch, loss, bad))

    def restart_clock(self) -> None:
        """Start the next throughput interval now: tokens/s counts training steps only, not evaluation or saving."""
        self.t_log = time.perf_counter()

    def flush(self) -> list[tuple[int, float, bool]]:
        """Move the pending losses into the metrics, the bar and TensorBoard; returns them as (step, loss, bad)."""
        if not self.pending:
            return []
        pending, metrics = self.pending, self.run.metrics
        both = torch.stack([torch.stack([p[3].float(), p[4].float()]) for p in pending]).tolist()  # (steps, 2)
        losses, bads = [b[0] for b in both], [b[1] > 0 for b in both]
        now = time.perf_counter()
        tok_s = len(pending) * self.tokens_per_step / (now - self.t_log)
        self.t_log = now
        for (step, lr, epoch, *_), value in zip(pending, losses):
            metrics.steps.append(step)
            metrics.train_loss.append(value)
            metrics.learning_rate.append(lr)
            metrics.epochs.append(epoch)
        last_step, last_lr = pending[-1][:2]
        metrics.log_steps.append(last_step)
        metrics.tokens_per_s.append(tok_s)
        if self.peak is not None:
            metrics.mfu.append(self.flops * tok_s / self.peak)
        self.bar.update(len(pending))
        self.bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{last_lr:.2e}", tok_s=f"{tok_s:,.0f}")
        self.scalars(last_step, {"train/loss": losses[-1], "train/lr": last_lr, "train/tokens_per_s": tok_s})
        self.pending = []
        return [(p[0], value, bad) for p, value, bad in zip(pending, losses, bads)]

    def write(self, line: str) -> None:
        """A line above the bar (plain stdout when the bar is off); rank 0's alone in a job of several."""
        if self.run.job.is_main:
            self.bar.write(line)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.run.board is not None:
            self.run.board.scalars(step, values)

    def close(self) -> None:
        self.bar.close()
        if self.run.board is not None:
            self.run.board.close()
