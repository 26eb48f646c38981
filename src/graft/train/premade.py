"""Premade classifiers: a hub module's feature signature plus a new head, fine-tuned in one call.

```python
clf = graft.ImageClassifier("efficientnet-lite0", classes=["cat", "dog"], fine_tune="head")
clf.train(graft.data.ImageFolder("photos/"), epochs=5)
clf.export("pets@1.0.0")        # a module with a `classify` signature, parent recorded
```

``fine_tune="head"`` keeps the backbone frozen: every example's features are computed once
and cached (keyed by module digest and example content), and only the head trains.
``"all"`` trains everything; an integer ``N`` trains the last ``N`` blocks of the backbone
(with everything after them) and the head.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from graft.errors import DataError
from graft.runtime.module import Module
from graft.data import module_collate
from graft.distribute.batch_norm import local_statistics
from graft.train.estimator import Estimator

__all__ = ["ClassifierModel", "ImageClassifier", "TextClassifier"]

_BLOCK = re.compile(r"^(.*?\.\d+)\.")


class ClassifierModel(nn.Module):
    """``head(dropout(backbone.signature(...)))``: raw logits over the classes."""

    def __init__(self, backbone: Module, signature: str, classes: int, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.signature = signature
        spec = backbone.signatures[signature].spec
        (output,) = spec.outputs.values()
        width = output.shape[-1]
        if not isinstance(width, int):
            raise DataError(f"signature {signature!r} of {backbone.name} outputs {output}, "
                            "whose last dimension is not fixed; a linear head needs a fixed "
                            "feature size")
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, classes))

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        features = self.backbone.call(self.signature, *args, **kwargs)  # (B, D)
        return self.head(features)  # (B, C)


class _Classifier:
    """Shared machinery of the image and text classifiers."""

    kind = ""
    default_signature = ""

    def __init__(self, module: str | os.PathLike[str] | Module, classes: Sequence[str], *,
                 fine_tune: str | int = "head", signature: str | None = None,
                 model_dir: str | os.PathLike[str] | None = None, learning_rate: float = 1e-3,
                 dropout: float = 0.0, cache_dir: str | os.PathLike[str] | None = None,
                 progress: bool = True, warm_start_from: _Classifier | None = None,
                 batch_norm: str | None = None, **estimator_options: Any) -> None:
        import graft

        self.classes = [str(c) for c in classes]
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise DataError(f"classes must be at least two distinct names, got {self.classes}")
        if not (fine_tune in ("head", "all") or (isinstance(fine_tune, int)
                                                 and not isinstance(fine_tune, bool)
                                                 and fine_tune >= 1)):
            raise ValueError(f"fine_tune must be 'head', 'all' or a number of last blocks >= 1, "
                             f"got {fine_tune!r}")
        self.fine_tune = fine_tune
        trainable = fine_tune != "head"
        backbone = module if isinstance(module, Module) else graft.load(
            module, trainable=trainable, batch_norm=batch_norm)
        self.signature = signature or self.default_signature
        if self.signature not in backbone.signatures:
            raise DataError(f"module {backbone.name} has no signature {self.signature!r}; it has "
                            f"{sorted(backbone.signatures)}")
        preprocess = backbone.signatures[self.signature].spec.preprocess
        if preprocess is None or preprocess.kind != self.kind:
            raise DataError(f"{type(self).__name__} needs a signature that preprocesses "
                            f"{self.kind} data; {backbone.name}:{self.signature} "
                            f"{'has no preprocessing' if preprocess is None else 'takes ' + preprocess.kind}")
        if isinstance(fine_tune, int):
            _freeze_all_but_last_blocks(backbone, self.signature, fine_tune)
        self.backbone = backbone
        self.model = ClassifierModel(backbone, self.signature, len(self.classes), dropout)
        if warm_start_from is not None:
            # The usual two-stage recipe: train the head on frozen features, then fine-tune
            # everything from that head with a small learning rate.
            if warm_start_from.classes != self.classes:
                raise DataError(f"warm_start_from has classes {warm_start_from.classes}, not "
                                f"{self.classes}")
            self.model.head.load_state_dict(warm_start_from.model.head.state_dict())
        self.model_dir = Path(model_dir).expanduser() if model_dir is not None else None
        self.progress = progress
        from graft.settings import graft_home

        self.cache_dir = Path(cache_dir) if cache_dir else graft_home() / "cache" / "features"
        optimizer = estimator_options.pop("optimizer", None) or (
            lambda params: torch.optim.Adam(params, lr=learning_rate))
        metrics = estimator_options.pop("metrics", ("accuracy",))
        if fine_tune == "head":
            # The backbone is frozen: train the head alone over cached features.
            self.estimator = Estimator(self.model.head, optimizer=optimizer, metrics=metrics,
                                       model_dir=self.model_dir, progress=progress,
                                       **estimator_options)
        else:
            self.estimator = Estimator(self.model, optimizer=optimizer, metrics=metrics,
                                       model_dir=self.model_dir, progress=progress,
                                       collate_fn=module_collate(backbone, self.signature),
                                       **estimator_options)
        self.metrics: dict[str, Any] = {}
        self.examples_seen = 0

    # -- data ----------------------------------------------------------------------------------

    def _check_data(self, data: Any, role: str) -> Any:
        try:
            length = len(data)
        except TypeError:
            raise DataError(f"{role} data must be a dataset of (example, label) items with a "
                            f"length, got {type(data).__name__}") from None
        if length == 0:
            raise DataError(f"{role} data is empty; give at least one labelled example")
        found = getattr(data, "classes", None)  # plain lists of pairs carry no class names
        if found is not None and list(found) != self.classes:
            raise DataError(f"{role} data has classes {list(found)} but the classifier was "
                            f"built for {self.classes}; build the dataset with "
                            f"classes={self.classes!r}")
        return data

    def _features(self, data: Any, batch_size: int) -> Any:
        from graft.data import FeatureCache

        cache = FeatureCache(self.cache_dir)
        return cache.dataset(self.backbone, self.signature, data, batch_size=batch_size,
                             progress=self.progress)

    def _steps(self, data: Any, epochs: int | None, max_steps: int | None,
               batch_size: int) -> int:
        if (epochs is None) == (max_steps is None):
            raise ValueError("give exactly one of epochs=N or max_steps=N")
        if max_steps is not None:
            return max_steps
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        return epochs * max(1, len(data) // batch_size)

    # -- the estimator's verbs -----------------------------------------------------------------

    def train(self, data: Any, *, epochs: int | None = None, max_steps: int | None = None,
              batch_size: int = 32, seed: int = 0) -> _Classifier:
        """Train on ``data`` (items ``(raw example, label)``) for ``epochs`` or ``max_steps``.

        A batch larger than the data is reduced to the data's size.
        """
        data = self._check_data(data, "training")
        batch_size = min(batch_size, len(data))
        steps = self._steps(data, epochs, max_steps, batch_size)
        if self.fine_tune == "head":
            data = self._features(data, batch_size=64)
        self.model.train()
        self.estimator.train(data, max_steps=self.estimator.step + steps, batch_size=batch_size,
                             seed=seed)
        self.examples_seen = len(data)
        return self

    def evaluate(self, data: Any, *, batch_size: int = 64) -> dict[str, Any]:
        """Loss and metrics (accuracy, ...) on labelled ``data``, each example counted once."""
        data = self._check_data(data, "evaluation")
        if self.fine_tune == "head":
            data = self._features(data, batch_size=batch_size)
        self.model.eval()
        self.metrics = self.estimator.evaluate(data, batch_size=batch_size)
        return self.metrics

    def predict(self, examples: Any, *, batch_size: int = 64) -> torch.Tensor:
        """Class probabilities ``(N, C)`` for raw examples (a list, or a labelled dataset)."""
        items = list(examples) if not hasattr(examples, "__getitem__") else examples
        collate = module_collate(self.backbone, self.signature)
        self.model.eval()
        outputs = []
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                chunk = [items[i] for i in range(start, min(start + batch_size, len(items)))]
                chunk = [c if isinstance(c, tuple) else (c, 0) for c in chunk]
                inputs, _ = collate(chunk)
                logits = (self.model(**inputs) if isinstance(inputs, dict)
                          else self.model(inputs))
                outputs.append(logits.softmax(-1))
        return torch.cat(outputs) if outputs else torch.empty(0, len(self.classes))

    def classify(self, examples: Any) -> list[str]:
        """The predicted class name of each raw example."""
        return [self.classes[i] for i in self.predict(examples).argmax(-1).tolist()]

    def export(self, handle: str | os.PathLike[str], *, description: str = "",
               license: str = "unknown") -> Any:
        """Save the classifier as a module: a ``classify`` signature returning logits, the
        class names as ``labels.txt``, the backbone's preprocessing, and the backbone as
        parent. Returns the ``SavedModule`` (``None`` on non-chief workers)."""
        spec = self.backbone.signatures[self.signature].spec
        strategy = self.estimator.strategy
        saved = None
        self.model.eval()
        if strategy.is_chief:
            with local_statistics():  # the other workers wait at the barrier below
                saved = self._save(handle, description, license, spec)
        strategy.barrier()
        return saved

    def _save(self, handle: str | os.PathLike[str], description: str, license: str,
              spec: Any) -> Any:
        import graft

        return graft.save(
            self.model, handle,
            description=description or (
                f"{len(self.classes)}-class {self.kind} classifier: "
                f"{self.backbone.name}:{self.signature} + a linear head "
                f"(fine-tuned: {self.fine_tune})"),
            license=license,
            signatures={"classify": graft.Signature(
                inputs=dict(spec.inputs), outputs=["logits"], preprocess=spec.preprocess,
                description=f"logits over {len(self.classes)} classes (labels.txt)")},
            assets={"labels.txt": "\n".join(self.classes) + "\n",
                    **self._tokenizer_asset(spec)},
            metadata={"fine_tune": str(self.fine_tune), "train_examples": self.examples_seen,
                      "evaluation": {k: float(v) for k, v in self.metrics.items()
                                     if isinstance(v, (int, float))}},
        )

    def _tokenizer_asset(self, spec: Any) -> dict[str, Path]:
        tokenizer = getattr(spec.preprocess, "tokenizer", None)
        if tokenizer is None:
            return {}
        name = tokenizer.removeprefix("assets/")
        return {name: self.backbone.asset_path(name)}


class ImageClassifier(_Classifier):
    """An image classifier over a hub module's image-feature signature.

    Args:
        module: Handle of the backbone module (or a loaded ``graft.Module``).
        classes: Class names, in label order.
        fine_tune: ``"head"`` (frozen backbone, cached features), ``"all"``, or the number of
            last backbone blocks to train.
        signature: The feature signature (default ``"features"``).
        model_dir: Checkpoints and TensorBoard logs; training there again resumes.
        learning_rate: Adam's learning rate (or pass ``optimizer=`` a factory).
        dropout: Dropout before the head.
        cache_dir: Feature cache (default ``$GRAFT_HOME/cache/features``).
        warm_start_from: Another classifier (same classes) whose trained head this one
            starts from: train the head with ``fine_tune="head"``, then fine-tune ``"all"``.
        batch_norm: When fine-tuning, ``"update"`` (batch statistics) or ``"frozen"``
            (running statistics kept, often better with small batches); default: the
            module's policy.
        **estimator_options: Passed to :class:`graft.Estimator` (``strategy``, ``metrics``...).
    """

    kind = "image"
    default_signature = "features"


class TextClassifier(_Classifier):
    """A text classifier over a hub module's sentence-embedding signature (default ``embed``).

    Same arguments as :class:`ImageClassifier`; examples are strings.
    """

    kind = "text"
    default_signature = "embed"


def _freeze_all_but_last_blocks(backbone: Module, signature: str, blocks: int) -> None:
    """Train only the last ``blocks`` numbered blocks of a signature and what follows them.

    Blocks are the numbered groups of parameter names (``_blocks.15``, ``encoder.layer.5``);
    their order is the order the signature's program takes its parameters in, which is the
    source model's definition order.
    """
    program, _ = backbone._program(signature, "eval")
    order = [b.target for b in program.inputs if b.kind == "parameter"]
    groups: list[str] = []
    for name in order:
        match = _BLOCK.match(name)
        if match and match.group(1) not in groups:
            groups.append(match.group(1))
    if not groups:
        raise DataError(f"{backbone.name}:{signature} has no numbered blocks to fine-tune; use "
                        "fine_tune='all' or 'head'")
    if blocks > len(groups):
        raise DataError(f"fine_tune={blocks} but {backbone.name} has {len(groups)} blocks; use "
                        f"at most {len(groups)} or 'all'")
    first = groups[-blocks]
    start = next(i for i, name in enumerate(order) if name.startswith(first + "."))
    trainable = set(order[start:])
    for name, param in backbone.weights.named_parameters():
        param.requires_grad_(name in trainable)
