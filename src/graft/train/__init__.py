"""Training: the Estimator, train_and_evaluate, exporters, callbacks, checkpoints.

Where each piece lives: ``estimator.py`` (:class:`Estimator`), ``training.py`` (its loop),
``evaluation.py``, ``inference.py`` (predict, export), ``sampling.py`` (example order,
sharding, streams, the data position), ``resume.py`` (resuming, warm starts), ``rng.py``,
``interrupt.py`` (Ctrl-C), ``checkpoint.py``, ``train_and_evaluate.py``, ``exporters.py``,
``sidecar.py`` (``graft evaluate --watch``), ``hooks.py`` (callbacks), ``metrics.py`` and
``custom_metrics.py``, ``specs.py``, ``premade.py`` (ImageClassifier, TextClassifier).
"""

from graft.train.checkpoint import Checkpoint, CheckpointManager, read_checkpoint
from graft.train.estimator import Estimator
from graft.train.exporters import BestExporter, Exporter, FinalExporter, LatestExporter
from graft.train.hooks import Callback, StopWhen
from graft.train.metrics import ClassificationMetrics
from graft.train.premade import ImageClassifier, TextClassifier
from graft.train.resume import WarmStart
from graft.train.specs import EarlyStopping, EvalSpec, TrainSpec
from graft.train.train_and_evaluate import train_and_evaluate

__all__ = [
    "BestExporter",
    "Callback",
    "Checkpoint",
    "CheckpointManager",
    "ClassificationMetrics",
    "EarlyStopping",
    "Estimator",
    "EvalSpec",
    "Exporter",
    "FinalExporter",
    "ImageClassifier",
    "LatestExporter",
    "StopWhen",
    "TextClassifier",
    "TrainSpec",
    "WarmStart",
    "read_checkpoint",
    "train_and_evaluate",
]
