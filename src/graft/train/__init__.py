"""Training: the MLE losses, the Estimator, data input, the feature cache, checkpoints."""

from graft.train.checkpoint import Checkpoint, CheckpointManager, read_checkpoint
from graft.train.estimator import Estimator, train_and_evaluate
from graft.train.metrics import ClassificationMetrics
from graft.train.premade import ImageClassifier, TextClassifier
from graft.train.specs import EarlyStopping, EvalSpec, TrainSpec

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "ClassificationMetrics",
    "EarlyStopping",
    "Estimator",
    "EvalSpec",
    "ImageClassifier",
    "TextClassifier",
    "TrainSpec",
    "read_checkpoint",
    "train_and_evaluate",
]
