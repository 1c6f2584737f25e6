"""The trainer shared by every model family, its checkpoints and distributed training."""
from genkern.train.checkpoint import CheckpointError
from genkern.train.trainer import TrainResult, load_trained, train

__all__ = ["CheckpointError", "TrainResult", "load_trained", "train"]
