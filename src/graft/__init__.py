"""Graft: a hub for reusable, fine-tunable, code-free PyTorch modules.

``import graft`` is cheap: torch and everything else load on first use of a name.
"""

from __future__ import annotations

import importlib
from typing import Any

from graft import errors
from graft.errors import (
    FormatError,
    GraftError,
    IntegrityError,
    ModuleNotFound,
    SignatureError,
    UnsafeContentError,
    VersionConflict,
)

__version__ = "0.1.0"

__all__ = [
    "BoundSignature",
    "DataParallel",
    "EarlyStopping",
    "Estimator",
    "EvalSpec",
    "FormatError",
    "GraftError",
    "ImageClassifier",
    "ImagePreprocess",
    "IntegrityError",
    "Module",
    "ModuleNotFound",
    "OneDevice",
    "SavedModule",
    "Signature",
    "SignatureError",
    "Store",
    "TensorSpec",
    "TextClassifier",
    "TextPreprocess",
    "TrainSpec",
    "UnsafeContentError",
    "VersionConflict",
    "__version__",
    "data",
    "distribute",
    "errors",
    "load",
    "losses",
    "pull",
    "push",
    "save",
    "train_and_evaluate",
]

# Public name -> the module that defines it, imported on first access.
_LAZY = {
    "DataParallel": "graft.distribute.data_parallel",
    "OneDevice": "graft.distribute.strategy",
    "EarlyStopping": "graft.train.specs",
    "Estimator": "graft.train.estimator",
    "EvalSpec": "graft.train.specs",
    "TrainSpec": "graft.train.specs",
    "train_and_evaluate": "graft.train.train_and_evaluate",
    "BoundSignature": "graft.runtime.module",
    "ImageClassifier": "graft.train.premade",
    "ImagePreprocess": "graft.format.spec",
    "Module": "graft.runtime.module",
    "SavedModule": "graft.export.save",
    "Signature": "graft.export.save",
    "Store": "graft.hub.store",
    "TensorSpec": "graft.format.spec",
    "TextClassifier": "graft.train.premade",
    "TextPreprocess": "graft.format.spec",
    "load": "graft.runtime.load",
    "pull": "graft.hub.oci.pull",
    "push": "graft.hub.oci.push",
    "save": "graft.export.save",
}


# Submodules reachable as attributes (graft.losses, graft.data) without an explicit import.
_SUBMODULES = {"data", "distribute", "losses"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"graft.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'graft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
