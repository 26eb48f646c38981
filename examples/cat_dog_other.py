"""Reuse without training: a cat / dog / other classifier from EfficientNet-Lite0's ImageNet head.

ImageNet-1k already knows 5 domestic cat classes (281-285) and 118 dog breeds (151-268). A fixed
head sums the classifier's probabilities over each group; nothing is trained. The result is
saved as a module of its own whose manifest names efficientnet-lite0 (handle and digest) as
its parent.

    python examples/cat_dog_other.py            # build, save to the store, classify photos
"""

from __future__ import annotations

import torch
from torch import nn

import graft
import graft.zoo

CLASSES = ["cat", "dog", "other"]
DOGS = range(151, 269)
CATS = range(281, 286)


class GroupHead(nn.Module):
    """Sums softmax probabilities of ImageNet classes into groups: (B, 1000) -> (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        groups = torch.zeros(1000, len(CLASSES))
        groups[list(CATS), 0] = 1.0
        groups[list(DOGS), 1] = 1.0
        groups[:, 2] = 1.0 - groups[:, 0] - groups[:, 1]
        self.register_buffer("groups", groups)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1) @ self.groups  # (B, 3)


def build(version: str = "1.0.0") -> graft.SavedModule:
    """Compose efficientnet-lite0's `classify` with the fixed head and save it to the store."""
    graft.zoo.import_module("efficientnet-lite0")
    backbone = graft.load("efficientnet-lite0")
    model = nn.Sequential(backbone.signature("classify"), GroupHead())
    classify = backbone.signatures["classify"].spec
    example = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return graft.save(
        model, f"cat-dog-other@{version}",
        description="Cat / dog / other probabilities from EfficientNet-Lite0's ImageNet classes.",
        license="Apache-2.0",
        signatures={"classify": graft.Signature(
            inputs=dict(classify.inputs), outputs=["probabilities"], example_inputs=(example,),
            preprocess=classify.preprocess, description="P(cat), P(dog), P(other)")},
        assets={"labels.txt": "\n".join(CLASSES) + "\n"},
    )  # the parent (efficientnet-lite0 and its digest) is recorded automatically


def main() -> None:
    from skimage import data

    saved = build()
    print(f"saved {saved.handle} {saved.digest}")
    module = graft.load("cat-dog-other")
    print("parents:", [(p.handle, p.digest[:19]) for p in module.manifest.parents])
    with torch.no_grad():
        probs = module([data.chelsea(), data.coffee()])
    for name, row in zip(["chelsea", "coffee"], probs):
        print(f"{name:8s}", "  ".join(f"{c} {p:.3f}" for c, p in zip(CLASSES, row.tolist())))


if __name__ == "__main__":
    main()
