"""Optimizers and learning-rate schedules."""

from fasttrain.optim.adamw import AdamW, adamw_reference

__all__ = ["AdamW", "adamw_reference"]
