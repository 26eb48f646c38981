"""The exported page in headless Chromium: inference, a head trained in the page, bad input.

Every number the page shows is checked against PyTorch: the page decodes the PNG, resizes it
with its own port of Pillow's resampling, runs the ONNX model in ONNX Runtime Web (wasm),
and trains the head in JavaScript; the test computes the same in Python from the same files.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import graft
import graft.losses

pytestmark = [pytest.mark.pretrained, pytest.mark.slow]

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CLASSES = {
    "photos": ("chelsea", "astronaut", "coffee", "rocket"),
    "science": ("immunohistochemistry", "retina", "cell", "hubble_deep_field"),
    "textures": ("brick", "grass", "gravel", "moon"),
}
TRAIN_STEPS = 60
LR = 0.01


def _try(page, path: Path) -> dict:
    """Give the "Try it" input one file; wait until the page has shown the result for it."""
    page.evaluate("window.graftPage.last = null; window.graftPage.errors = []")
    page.set_input_files("#try-file", str(path))
    page.wait_for_function("window.graftPage.last !== null || window.graftPage.errors.length",
                           timeout=120_000)
    return page.evaluate("window.graftPage.last")


def _message(page) -> str:
    page.wait_for_selector("#message:not([hidden])", timeout=60_000)
    return page.inner_text("#message")


def test_page_classifies_photos_as_pytorch_does(web_store, page, photos, tmp_path):
    module = graft.load("efficientnet-lite0")
    for name in ("chelsea", "astronaut", "coffee"):
        shown = _try(page, photos[name])
        assert shown is not None, page.evaluate("window.graftPage.errors")
        with torch.no_grad():
            expected = module.call("classify", [str(photos[name])]).softmax(-1)[0].double()
        got = torch.tensor(shown["probs"], dtype=torch.float64)
        assert got.shape == expected.shape == (1000,)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        if name == "chelsea":
            chelsea = shown
            page.screenshot(path=str(tmp_path / "chelsea.png"), full_page=True)
            assert shown["top"][0]["index"] in CATS
            labels = module.asset_path("labels.txt").read_text().splitlines()
            first = page.inner_text("#top-classes li:first-child .label")
            assert first == labels[int(expected.argmax())]
    # Dropping the file on the page gives the same answer as picking it.
    page.evaluate("window.graftPage.last = null")
    page.evaluate("""([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, { type: "image/png" }));
        document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
    }""", ["dropped.png", base64.b64encode(photos["chelsea"].read_bytes()).decode()])
    page.wait_for_function("window.graftPage.last !== null", timeout=120_000)
    dropped = page.evaluate("window.graftPage.last")
    assert dropped["name"] == "dropped.png"
    torch.testing.assert_close(torch.tensor(dropped["probs"]), torch.tensor(chelsea["probs"]),
                               atol=1e-7, rtol=0)
    timing = page.inner_text("#try-time")
    # A plain static server gives no cross-origin isolation, so the page runs one thread.
    assert "ms in the model (WebAssembly, 1 thread)" in timing
    assert page.crashes == []


def _add_examples(page, index: int, name: str, paths: list[Path]) -> None:
    row = page.locator(".class").nth(index)
    row.locator(".class-name").fill(name)
    row.locator(".class-files").set_input_files([str(p) for p in paths])
    page.wait_for_function(
        f"window.graftPage.examples[{index}].features.length === {len(paths)}", timeout=300_000)


def _blob_bytes(home: Path) -> int:
    """Bytes the store's blobs take on disk (hard links counted once)."""
    seen, total = set(), 0
    for path in (home / "blobs").rglob("*"):
        if path.is_file():
            st = path.stat()
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def _torch_losses(features, labels, weight, bias, steps) -> list[float]:
    """The same head trained with graft.losses and torch.optim.Adam, full batch."""
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=LR)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = graft.losses.sparse_softmax_cross_entropy(logits=head(features), labels=labels)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_head_trained_in_page_matches_torch_and_imports_back(web_store, page, photos, tmp_path):
    page.click("#add-class")  # the page starts with two classes
    for i, (name, members) in enumerate(CLASSES.items()):
        _add_examples(page, i, name, [photos[m] for m in members])
    page.fill("#steps", str(TRAIN_STEPS))
    page.fill("#lr", str(LR))
    page.fill("#seed", "7")
    page.click("#train-run")
    page.wait_for_function("window.graftPage.training !== null", timeout=120_000)
    training = page.evaluate("""() => { const t = window.graftPage.training;
        return {classes: t.classes, features: t.features, labels: t.labels, initial: t.initial,
                history: t.history, accuracy: t.accuracy}; }""")
    page.screenshot(path=str(tmp_path / "trained.png"), full_page=True)
    assert training["classes"] == list(CLASSES)
    assert training["accuracy"] == 1.0
    assert "training accuracy 100%" in page.inner_text("#train-progress")

    # The features the page computed are the module's features in PyTorch.
    module = graft.load("efficientnet-lite0")
    files = [str(photos[m]) for members in CLASSES.values() for m in members]
    with torch.no_grad():
        expected_features = module.call("features", files)
    features = torch.tensor(training["features"], dtype=torch.float32)
    torch.testing.assert_close(features, expected_features, atol=1e-4, rtol=1e-4)

    # Its loss curve is torch's, from the same features and the same initial head.
    classes, dim = len(CLASSES), features.shape[1]
    weight = torch.tensor(training["initial"]["weight"], dtype=torch.float32).view(classes, dim)
    bias = torch.tensor(training["initial"]["bias"], dtype=torch.float32)
    bound = 1 / dim ** 0.5
    assert float(weight.abs().max()) <= bound and float(weight.std()) > bound / 3
    labels = torch.tensor(training["labels"])
    expected = _torch_losses(features, labels, weight, bias, 20)
    got = [h["loss"] for h in training["history"][:20]]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert got[-1] < got[0]

    # New images, classified by the head in the page ...
    shown = {}
    for name in ("mirrored", "camera"):
        page.evaluate("window.graftPage.headLast = null")
        page.set_input_files("#head-file", str(photos[name]))
        page.wait_for_function("window.graftPage.headLast !== null", timeout=60_000)
        shown[name] = page.evaluate("window.graftPage.headLast.probs")
    assert int(np.argmax(shown["mirrored"])) == 0  # the mirrored cat is a photo

    # ... and by the downloaded head, imported back as a child module, in Python.
    with page.expect_download() as download:
        page.click("#download-safetensors")
    head_file = tmp_path / "head.safetensors"
    download.value.save_as(head_file)
    with page.expect_download() as download:
        page.click("#download-json")
    json_file = tmp_path / "head.json"
    download.value.save_as(json_file)
    assert json.loads(json_file.read_text())["classes"] == list(CLASSES)

    from graft.cli import main

    before = _blob_bytes(web_store)
    assert main(["import-head", str(head_file), "--parent", "efficientnet-lite0",
                 "--out", "science-or-not@1.0.0"]) == 0
    assert main(["import-head", str(json_file), "--parent", "efficientnet-lite0@1.0.0",
                 "--out", "science-or-not@1.0.1"]) == 0
    parent = graft.load("efficientnet-lite0")
    # The children store their head and programs; the backbone's 20 MB of tensors are shared.
    weights = sum(t.numel() * t.element_size() for t in parent.state_dict().values())
    assert _blob_bytes(web_store) - before < weights / 4
    for handle in ("science-or-not@1.0.0", "science-or-not@1.0.1"):
        child = graft.load(handle)
        assert [(p.handle, p.digest) for p in child.manifest.parents] == [
            ("efficientnet-lite0@1.0.0", parent.digest)]
        assert child.asset_path("labels.txt").read_text().split("\n")[:3] == list(CLASSES)
        parent_tensors = {t.sha256 for t in parent.manifest.tensors.values()}
        backbone = {k: t for k, t in child.manifest.tensors.items() if k.startswith("backbone.")}
        assert len(backbone) == len(parent.manifest.tensors)
        assert all(t.sha256 in parent_tensors for t in backbone.values())
        with torch.no_grad():
            probs = child.call("classify", [str(photos["mirrored"]), str(photos["camera"])])
        probs = probs.softmax(-1).double()
        page_probs = torch.tensor([shown["mirrored"], shown["camera"]], dtype=torch.float64)
        torch.testing.assert_close(probs, page_probs, atol=1e-4, rtol=0)
    assert page.crashes == []


def test_bad_input_shows_a_message_and_the_page_keeps_working(web_store, page, photos,
                                                              tmp_path):
    from PIL import Image

    not_image = tmp_path / "notes.png"
    not_image.write_text("these are my notes, not a picture\n")
    _try(page, not_image)
    assert "notes.png is not an image this browser can read" in _message(page)

    huge = tmp_path / "huge.png"
    Image.new("L", (10_000, 10_000)).save(huge)
    _try(page, huge)
    message = _message(page)
    assert "huge.png is 10000 × 10000 pixels" in message and "scale it down" in message

    # One class with images, one with none.
    _add_examples(page, 0, "cats", [photos["chelsea"]])
    page.click("#train-run")
    page.wait_for_function("document.getElementById('message').textContent.includes('no examples')")
    assert 'Class "class 2" has no examples' in _message(page)
    assert page.evaluate("window.graftPage.training") is None
    page.screenshot(path=str(tmp_path / "no-examples.png"), full_page=True)

    # Nothing crashed: the page still classifies.
    shown = _try(page, photos["chelsea"])
    assert shown is not None and shown["top"][0]["index"] in CATS
    assert page.is_hidden("#message")
    assert page.crashes == []
