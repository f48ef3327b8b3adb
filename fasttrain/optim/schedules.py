"""Learning-rate schedules: lr as a pure function of the step, so a checkpoint needs only the step to resume one.

    sched = LRSchedule("cosine", lr=3e-4, warmup_steps=100, total_steps=5000, min_lr=3e-5)
    for step in range(5000):
        sched.apply(optimizer, step)   # sets every param group's lr
        ...

As a torch scheduler: `torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: sched(s) / sched.lr)`.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

SCHEDULES = ("constant", "cosine", "linear", "inverse_sqrt")


class LRSchedule:
    """lr(step) for step = 0, 1, ... (the step about to be taken).

    - constant: lr after the warmup.
    - cosine / linear: warmup, then decay from lr to min_lr at total_steps (held at min_lr after).
    - inverse_sqrt (Noam): warmup to lr at step warmup_steps, then lr * sqrt(warmup_steps / (step + 1)).
    Warmup is linear from lr / warmup_steps at step 0 to lr at step warmup_steps - 1 (never 0, so step 0 learns).
    """

    def __init__(
        self,
        kind: str = "constant",
        *,
        lr: float,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr: float = 0.0,
    ):
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
        if not 0 < lr < math.inf:
            raise ValueError(f"lr must be finite and > 0, got {lr}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if kind == "inverse_sqrt" and warmup_steps < 1:
            raise ValueError("the inverse_sqrt schedule needs warmup_steps >= 1 (its peak is at warmup_steps)")
        if kind in ("cosine", "linear") and (total_steps is None or total_steps <= warmup_steps):
            raise ValueError(
                f"the {kind} schedule needs total_steps > warmup_steps ({warmup_steps}), got {total_steps}"
            )
        if not 0.0 <= min_lr <= lr:
            raise ValueError(f"min_lr must be in [0, lr={lr}], got {min_lr}")
        self.kind, self.lr, self.warmup_steps = kind, lr, warmup_steps
        self.total_steps, self.min_lr = total_steps, min_lr

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.kind == "inverse_sqrt":
            return self.lr * min((step + 1) / self.warmup_steps, math.sqrt(self.warmup_steps / (step + 1)))
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1.0 - progress
        return self.min_lr + (self.lr - self.min_lr) * shape

    def apply(self, optimizer: Optimizer, step: int) -> float:
        """Set every param group's lr to lr(step); return it."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr": self.min_lr,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> LRSchedule:
        return cls(
            state["kind"],
            lr=state["lr"],
            warmup_steps=state["warmup_steps"],
            total_steps=state["total_steps"],
            min_lr=state["min_lr"],
        )
