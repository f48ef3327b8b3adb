"""What runs between steps: evaluation, early stopping, and the SIGINT/SIGTERM handler that asks for a clean stop."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading

import torch


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches, n_batches: int, device: torch.device, autocast=contextlib.nullcontext
) -> dict[str, float]:
    """Mean loss (nats/token), perplexity and next-token accuracy over n_batches of `batches`: (x, y) pairs, or
    (x, y, positions, cu_seqlens) of packed examples, whose targets of -100 (prompts, padding) are not counted."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    tokens = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(n_batches):
        x, y, *packed = (t.to(device) for t in batches.next())
        kwargs = {"positions": packed[0], "cu_seqlens": packed[1]} if packed else {}
        with autocast():
            logits, _ = model(x, **kwargs)  # (B, T, V)
        logits = logits.float()
        loss_sum += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1),
            y.flatten(),  # (B*T, V), (B*T,)
            reduction="sum",
            ignore_index=-100,
        )
        counted = y != -100
        correct += ((logits.argmax(-1) == y) & counted).sum()
        tokens += counted.sum()
    model.train(was_training)
    tokens = tokens.item()
    loss = loss_sum.item() / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct.item() / tokens}


class EarlyStopping:
    """Tracks the best validation loss; `should_stop` after `patience` evaluations without a lower one."""

    def __init__(self, patience: int | None):
        self.patience = patience
        self.best = math.inf
        self.bad_evals = 0

    def update(self, val_loss: float) -> bool:
        """Record one evaluation; True if it is the best so far."""
        if val_loss < self.best:
            self.best, self.bad_evals = val_loss, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_evals = state["best"], state["bad_evals"]


class StopRequest:
    """While active, SIGINT and SIGTERM set `.signal` instead of killing the run; the loop then checkpoints and stops.

    A second signal restores the previous handlers and acts as they would (KeyboardInterrupt for SIGINT, exit for a
    default SIGTERM): a step or evaluation can take minutes, and Ctrl-C twice must still stop the process. Cutting a
    checkpoint write short that way is safe, since every file is written atomically (fasttrain.train.files).
    Only the main thread can install signal handlers; elsewhere (a training thread) the signals keep their handlers.
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signum
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.__exit__()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)  # the default action (termination), now that our handler is gone

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
