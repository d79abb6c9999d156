"""Training: ``train(TrainConfig(...))`` runs byte-level language modelling with stateful truncated
back-propagation, evaluation, checkpoints, exact resume and torchrun data parallelism."""

from .checkpoint import load_model, read_config, save_checkpoint
from .config import TrainConfig, default_model
from .trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "default_model", "load_model", "read_config",
           "save_checkpoint", "train"]
