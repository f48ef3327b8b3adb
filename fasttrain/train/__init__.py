"""The trainer: `from fasttrain.train import TrainConfig, train`."""

from fasttrain.train.config import OptimConfig, RunConfig, TrainConfig
from fasttrain.train.loop import TrainResult, train

__all__ = ["OptimConfig", "RunConfig", "TrainConfig", "TrainResult", "train"]
