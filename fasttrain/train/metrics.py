"""The run's metrics history: `training_metrics.json` (rewritten atomically as training goes) and the two plots."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fasttrain._files import atomic_write, atomic_write_text

METRICS_FILE = "training_metrics.json"


@dataclass
class Metrics:
    steps: list[int] = field(default_factory=list)
    """Optimizer steps completed, one entry per step."""
    train_loss: list[float] = field(default_factory=list)
    """Mean loss of each step's batch (nats/token), one entry per step."""
    learning_rate: list[float] = field(default_factory=list)
    """Learning rate each step ran at."""
    epochs: list[float] = field(default_factory=list)
    """Passes over the training split after each step."""
    tokens_per_s: list[float] = field(default_factory=list)
    """Throughput over the log interval that ended at each logged step (one entry per log, at log_steps)."""
    mfu: list[float] = field(default_factory=list)
    """Model FLOPs utilisation at each log_steps entry (GPU with bf16/fp16 only; empty otherwise)."""
    log_steps: list[int] = field(default_factory=list)
    """The step that ended each log interval (x axis of tokens_per_s and mfu)."""
    val_steps: list[int] = field(default_factory=list)
    """The step after which each evaluation ran (x axis of the val_* lists)."""
    val_epochs: list[float] = field(default_factory=list)
    """Passes over the training split at each evaluation."""
    val_loss: list[float] = field(default_factory=list)
    """Mean validation loss (nats/token) over the same eval_batches each time."""
    val_perplexity: list[float] = field(default_factory=list)
    """exp(val_loss)."""
    val_accuracy: list[float] = field(default_factory=list)
    """Fraction of validation tokens whose argmax prediction is the next token."""
    skipped_steps: list[int] = field(default_factory=list)
    """Steps skipped for a non-finite loss or gradient norm (their train_loss entries are the losses seen)."""

    def record_val(self, step: int, epoch: float, result: dict[str, float]) -> None:
        self.val_steps.append(step)
        self.val_epochs.append(epoch)
        self.val_loss.append(result["loss"])
        self.val_perplexity.append(result["perplexity"])
        self.val_accuracy.append(result["accuracy"])

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> Metrics:
        return cls(**state)

    def write(self, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / METRICS_FILE, json.dumps(self.state_dict()))

    def plot(self, run_dir: Path) -> None:
        """training_curve.png (losses by step, lr on a log axis) and loss_by_epoch.png."""
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a training machine
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot(self.steps, self.train_loss, label="train loss", lw=1)
        if self.val_steps:
            ax.plot(self.val_steps, self.val_loss, "o-", label="val loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        lr_ax = ax.twinx()
        lr_ax.plot(self.steps, self.learning_rate, color="gray", ls="--", lw=1, label="learning rate")
        lr_ax.set_yscale("log")
        lr_ax.set_ylabel("learning rate")
        handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], loc="upper right")
        _save(fig, Path(run_dir) / "training_curve.png")

        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot(self.epochs, self.train_loss, label="train loss", lw=1)
        if self.val_steps:
            ax.plot(self.val_epochs, self.val_loss, "o-", label="val loss")
        ax.set_xlabel("epoch (passes over the training split)")
        ax.set_ylabel("loss (nats/token)")
        ax.legend(loc="upper right")
        _save(fig, Path(run_dir) / "loss_by_epoch.png")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


class TensorBoard:
    """Scalars to RUN/tensorboard when train.tensorboard is on."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError(
                "train.tensorboard=true needs the tensorboard package (pip install 'fasttrain[tensorboard]')"
            ) from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
