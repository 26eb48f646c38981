"""Transfer learning with few labels: scikit-learn's handwritten digits, 10 examples per class.

Three ways to get a digit classifier from 100 labelled images, evaluated on 500 held-out ones:

1. a small CNN trained from scratch on the 8x8 images;
2. EfficientNet-Lite0 frozen + a new head: features computed once into the feature cache,
   then only the head trains;
3. EfficientNet-Lite0 fine-tuned end to end, starting from row 2's head (small learning rate,
   batch norm frozen: with 20 upsampled digits per batch, batch statistics would be noise).

The best one is exported to the store and reloaded by its handle.

    python examples/transfer_digits.py
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import graft
import graft.zoo
from graft.data import ArrayDataset, few_shot

TRAIN_PER_CLASS = 10
EVAL_PER_CLASS = 50
HANDLE = "digits-classifier@1.0.0"


class SmallCNN(nn.Module):
    """Two conv layers for 1x8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 4, 4)
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * 16, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)  # (B, 10)


def datasets() -> tuple[Any, Any, Any, Any]:
    """(train, eval) as uint8 images for the hub module and as float tensors for the CNN."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    classes = [str(d) for d in range(10)]
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (N, 8, 8), 0..255
    photos = ArrayDataset(images, digits.target, classes=classes)
    train, rest = few_shot(photos, TRAIN_PER_CLASS, seed=0)
    test, _ = few_shot(rest, EVAL_PER_CLASS, seed=1)
    tensors = ArrayDataset(torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0,
                           digits.target, classes=classes)
    return train, test, _same_items(tensors, train), _same_items(tensors, test)


def _same_items(dataset: ArrayDataset, subset: Any) -> Any:
    from graft.data import LabeledSubset

    return LabeledSubset(dataset, subset.indices)


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    start = time.perf_counter()
    accuracy = fn()
    return accuracy, time.perf_counter() - start


def main() -> None:
    graft.zoo.import_module("efficientnet-lite0")
    train, test, train_t, test_t = datasets()
    print(f"{len(train)} training images ({TRAIN_PER_CLASS} per class), {len(test)} held out")
    rows: list[tuple[str, float, float, Any]] = []

    torch.manual_seed(0)
    scratch = graft.Estimator(SmallCNN(), progress=False, tensorboard=False,
                              optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))

    def from_scratch() -> float:
        scratch.train(train_t, max_steps=300, batch_size=20)
        return scratch.evaluate(test_t)["accuracy"]

    rows.append(("small CNN from scratch", *timed(from_scratch), scratch))

    head = graft.ImageClassifier("efficientnet-lite0", classes=train.dataset.classes,
                                 fine_tune="head", learning_rate=1e-3, tensorboard=False)

    def frozen_head() -> float:
        head.train(train, epochs=30, batch_size=20)
        return head.evaluate(test)["accuracy"]

    rows.append(("efficientnet-lite0 frozen + head (feature cache)", *timed(frozen_head), head))

    tuned = graft.ImageClassifier("efficientnet-lite0", classes=train.dataset.classes,
                                  fine_tune="all", learning_rate=1e-4, warm_start_from=head,
                                  batch_norm="frozen",
                                  tensorboard=False)

    def end_to_end() -> float:
        tuned.train(train, epochs=2, batch_size=20)
        return tuned.evaluate(test)["accuracy"]

    rows.append(("efficientnet-lite0 fine-tuned end to end", *timed(end_to_end), tuned))

    print(f"\n{'approach':<50} {'accuracy':>8} {'wall time':>10}")
    for name, accuracy, seconds, _ in rows:
        print(f"{name:<50} {accuracy:8.3f} {seconds:9.1f}s")

    name, accuracy, _, best = max(rows, key=lambda row: row[1])
    if best is scratch:
        saved = scratch.export(HANDLE, example_inputs=(test_t[0][0].unsqueeze(0),))
        check = [test_t[i][0] for i in range(8)]
        expected = scratch.predict(torch.stack(check)).argmax(-1)
    else:
        saved = best.export(HANDLE, description="Handwritten digit classifier (0-9) trained on "
                            f"{len(train)} scikit-learn digits: {name}")
        check = [test[i][0] for i in range(8)]
        expected = best.predict(check).argmax(-1)
    reloaded = graft.load(HANDLE)
    with torch.no_grad():
        again = reloaded(torch.stack(check) if best is scratch else check).argmax(-1)
    print(f"\nbest: {name} ({accuracy:.3f}) exported as {saved.handle} {saved.digest[:19]}...")
    print(f"reloaded by handle: predictions {again.tolist()} "
          f"{'match' if torch.equal(again, expected) else 'DO NOT match'} the estimator's")
    print("parents:", [p.handle for p in reloaded.manifest.parents] or "none")


if __name__ == "__main__":
    main()
