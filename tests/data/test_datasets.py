"""graft.data: labelled datasets, deterministic splits, collation for a module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import graft
from graft.errors import DataError, SignatureError
from graft.runtime.preprocess import image_preprocessor
from graft.data import (
    ArrayDataset,
    ImageFolder,
    LabeledSubset,
    TextTable,
    collate_images,
    collate_text,
    content_sha256,
    example_sha256,
    few_shot,
    module_collate,
    module_transform,
    split,
)
from tests.conftest import BagOfWords, Pool, env_with_src, write_word_tokenizer

PRE = graft.ImagePreprocess(size=16, resize=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _pixels(seed: int, size: tuple[int, int] = (20, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _write(path: Path, seed: int, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pixels(seed)).save(path, format=fmt)
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """cats: 3 images (PNG, JPEG, grayscale), dogs: 2 images, plus files to ignore."""
    root = tmp_path / "photos"
    _write(root / "cats" / "a.png", 1)
    _write(root / "cats" / "b.JPG", 2, "JPEG")
    Image.fromarray(_pixels(3)[..., 0]).save(root / "cats" / "c.png")  # grayscale
    _write(root / "dogs" / "x.png", 4)
    _write(root / "dogs" / "nested" / "y.png", 5)
    (root / "dogs" / "README.txt").write_text("not an image, ignored by suffix")
    (root / "dogs" / ".DS_Store").write_bytes(b"\0\1")
    return root


@pytest.fixture(scope="module")
def image_module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("modules") / "pool"
    graft.save(Pool(), path, name="pool", version="1", signatures={
        "features": graft.Signature("features", inputs={"images": "float32[batch,3,16,16]"},
                                    preprocess=PRE)})
    return path


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_word_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def text_module_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_json: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("modules") / "bow"
    graft.save(BagOfWords(), path, name="bow", version="1", signatures={
        "embed": graft.Signature(
            inputs={"input_ids": "int64[batch,seq]", "attention_mask": "int64[batch,seq]"},
            preprocess=graft.TextPreprocess("assets/tokenizer.json", max_length=4))},
        assets={"tokenizer.json": tokenizer_json})
    return path


# --------------------------------------------------------------------------------------------
# ImageFolder


def test_image_folder_lists_classes_labels_and_rgb_images(photos):
    data = ImageFolder(photos)
    assert data.classes == ["cats", "dogs"]
    assert data.labels == [0, 0, 0, 1, 1]
    assert [p.relative_to(photos).as_posix() for p, _ in data.samples] == [
        "cats/a.png", "cats/b.JPG", "cats/c.png", "dogs/x.png", "dogs/nested/y.png"]
    assert data.skipped == []
    assert [p.name for p in data.ignored] == ["README.txt"]
    for i in range(len(data)):
        image, label = data[i]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert label == data.labels[i]
    np.testing.assert_array_equal(np.asarray(data[0][0]), _pixels(1))


def test_image_folder_transform_gives_the_module_preprocessing(photos, image_module_dir):
    module = graft.load(image_module_dir)
    data = ImageFolder(photos, transform=module_transform(module, "features"))
    tensor, label = data[0]
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32 and label == 0
    expected = image_preprocessor(PRE, "images")([photos / "cats" / "a.png"])["images"][0]
    torch.testing.assert_close(tensor, expected, rtol=0, atol=0)


def test_image_folder_with_given_classes(photos):
    data = ImageFolder(photos, classes=["dogs", "cats", "birds"])
    assert data.classes == ["dogs", "cats", "birds"]
    assert Counter(data.labels) == {0: 2, 1: 3}  # no 'birds' folder: allowed, no examples
    with pytest.raises(DataError, match=r"folder '.*dogs' is not one of the classes \['cats', "
                                        r"'birds'\]"):
        ImageFolder(photos, classes=["cats", "birds"])
    with pytest.raises(DataError, match="'cats' twice"):
        ImageFolder(photos, classes=["cats", "cats"])


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class sub-folders"):
        ImageFolder(tmp_path / "empty")
    (tmp_path / "empty" / "cats").mkdir()
    (tmp_path / "empty" / "dogs").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing")


def test_images_without_class_folders_get_a_hint(tmp_path):
    _write(tmp_path / "flat" / "a.png", 1)
    with pytest.raises(DataError, match="no class folders: move each class's images"):
        ImageFolder(tmp_path / "flat")


def test_one_class_only_is_an_error(tmp_path):
    _write(tmp_path / "root" / "cats" / "a.png", 1)
    _write(tmp_path / "root" / "cats" / "b.png", 2)
    with pytest.raises(DataError, match="a classifier needs at least two classes; found only "
                                        "'cats'"):
        ImageFolder(tmp_path / "root")
    with pytest.raises(DataError, match="at least two classes; found only 'cats'"):
        ImageFolder(tmp_path / "root", classes=["cats"])


def test_class_folder_without_readable_images_is_an_error(photos):
    (photos / "birds").mkdir()
    (photos / "birds" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="'birds' under .* hold no readable images"):
        ImageFolder(photos)


def test_corrupt_images_are_skipped_and_reported(photos):
    good = (photos / "cats" / "b.JPG").read_bytes()
    (photos / "cats" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (photos / "dogs" / "text.png").write_text("this is not a PNG")
    (photos / "dogs" / "empty.jpeg").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 3 of 8 image files .*dataset\.skipped"):
        data = ImageFolder(photos)
    assert len(data) == 5 and data.labels == [0, 0, 0, 1, 1]
    reasons = {p.name: r for p, r in data.skipped}
    assert set(reasons) == {"truncated.jpg", "text.png", "empty.jpeg"}
    assert all(p.is_file() and photos in p.parents for p, _ in data.skipped)
    assert "truncated" in reasons["truncated.jpg"].lower()
    assert "not an image Pillow can identify" in reasons["text.png"]
    assert reasons["empty.jpeg"] == "the file is empty"
    assert (photos / "cats" / "truncated.jpg").exists()  # reported, never deleted


def test_all_images_corrupt_is_an_error(tmp_path):
    for name in ("cats", "dogs"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.png").write_text("nope")
    with pytest.warns(UserWarning, match="skipped 2 of 2"), \
            pytest.raises(DataError, match="no readable images: all 2 image files failed"):
        ImageFolder(tmp_path)


def test_image_changed_after_construction_is_a_clear_error(photos):
    data = ImageFolder(photos)
    (photos / "cats" / "a.png").write_text("overwritten")
    with pytest.raises(DataError, match="could not be read, though it could when"):
        data[0]


def test_image_folder_fingerprint_follows_file_changes(photos):
    path = photos / "cats" / "a.png"
    old = time.time() - 3600
    os.utime(path, (old, old))  # an old file: its hash is reused while it is unchanged
    data = ImageFolder(photos)
    before = example_sha256(data, 0)
    assert example_sha256(data, 0) == before
    _write(path, 99)
    assert example_sha256(data, 0) != before
    assert example_sha256(ImageFolder(photos), 0) == example_sha256(data, 0)
    transformed = ImageFolder(photos, transform=lambda im: torch.zeros(1))
    assert transformed.fingerprint(0) is None


# --------------------------------------------------------------------------------------------
# TextTable


def test_csv_table(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('text,label,extra\n"great, loved it",pos,1\nawful,neg,2\n\nfine,pos,3\n',
                    encoding="utf-8")
    data = TextTable(path)
    assert data.classes == ["neg", "pos"]
    assert len(data) == 3
    assert data[0] == ("great, loved it", 1) and data[1] == ("awful", 0)
    assert data.labels == [1, 0, 1] and data.lines == [2, 3, 5]


def test_jsonl_table_with_other_columns_and_numeric_labels(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"review": f"text {i}", "stars": i % 11} for i in range(22)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = TextTable(path, text_column="review", label_column="stars")
    assert data.classes == [str(i) for i in range(11)]  # numeric order: '2' before '10'
    assert data[10] == ("text 10", 10)


def test_tsv_and_bom(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("\ufefftext\tlabel\na b\tx\nc\ty\n", encoding="utf-8")
    assert TextTable(path)[0] == ("a b", 0)


def test_labels_not_in_classes_name_the_labels_and_lines(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\na,pos\nb,neutral\nc,neg\nd,mixed\n")
    with pytest.raises(DataError, match=r"data\.csv: 2 rows have labels that are not among the "
                                        r"classes \['neg', 'pos'\]: 'neutral' \(line 3\), "
                                        r"'mixed' \(line 5\)"):
        TextTable(path, classes=["neg", "pos"])


def test_missing_column_lists_available_columns(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("sentence,label\nhello,a\nbye,b\n")
    with pytest.raises(DataError, match=r"no column 'text'; the available columns are "
                                        r"\['sentence', 'label'\]"):
        TextTable(path)
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"sentence": "hi", "label": "a"}\n')
    with pytest.raises(DataError, match=r"line 1 has no column 'text'; the available columns "
                                        r"are \['sentence', 'label'\]"):
        TextTable(jsonl)


@pytest.mark.parametrize("name, content, match", [
    ("empty.csv", "", "is empty; it needs a header row"),
    ("header.csv", "text,label\n", "has no rows"),
    ("empty.jsonl", "\n\n", "has no rows"),
    ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": oops}\n', "line 2 is not valid JSON"),
    ("list.jsonl", '["a", "x"]\n', "line 1 is a JSON list"),
    ("num.jsonl", '{"text": 3, "label": "x"}\n', "'text' must be a string"),
    ("ragged.csv", "text,label\na,x,extra\n", "line 2 has 3 fields but the header has 2"),
    ("one.csv", "text,label\na,x\nb,x\n", "at least two classes; found only 'x'"),
    ("data.txt", "text,label\n", "reads .csv, .tsv, .jsonl or .ndjson"),
])
def test_malformed_tables(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        TextTable(path)


def test_missing_table_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        TextTable(tmp_path / "nope.csv")


# --------------------------------------------------------------------------------------------
# ArrayDataset


def test_array_dataset_of_images_strings_and_tensors():
    images = np.stack([_pixels(i, (8, 8)) for i in range(6)])
    data = ArrayDataset(images, np.array([0, 2, 1, 0, 2, 1]))
    assert data.classes == ["0", "1", "2"] and data.labels == [0, 2, 1, 0, 2, 1]
    example, label = data[1]
    np.testing.assert_array_equal(example, images[1])
    assert label == 2 and isinstance(label, int)

    texts = ArrayDataset(["a", "b", "c"], ["neg", "pos", "neg"])
    assert texts.classes == ["neg", "pos"] and texts[1] == ("b", 1)

    tensors = ArrayDataset(torch.zeros(4, 3, 16, 16), torch.tensor([1, 0, 1, 0]),
                           classes=["cat", "dog"])
    assert tensors.classes == ["cat", "dog"] and tensors[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("inputs, labels, classes, match", [
    ([], [], None, "no examples"),
    (["a", "b"], [0], None, "2 inputs but 1 labels"),
    (["a", "b"], [0, -1], None, "whole numbers >= 0"),
    (["a", "b"], [0, 0.5], None, "whole numbers >= 0"),
    (["a", "b"], [0, 2], ["x", "y"], "label 2 is out of range for 2 classes"),
    (["a", "b"], ["x", "z"], ["x", "y"], r"'z' \(item 1\)"),
    (["a", "b"], [0, 0], None, "found only '0'"),
    (["a", "b"], [0, "x"], None, "all be class indices"),
    ("ab", [0, 1], None, "got one string"),
])
def test_array_dataset_bad_inputs(inputs, labels, classes, match):
    with pytest.raises(DataError, match=match):
        ArrayDataset(inputs, labels, classes)


# --------------------------------------------------------------------------------------------
# split and few_shot


def _table(n_per_class: tuple[int, ...]) -> ArrayDataset:
    labels = [c for c, n in enumerate(n_per_class) for _ in range(n)]
    order = np.random.default_rng(0).permutation(len(labels))  # interleave the classes
    labels = [labels[i] for i in order]
    return ArrayDataset([f"example {i}" for i in range(len(labels))], labels)


def test_split_is_disjoint_covering_stratified_and_deterministic():
    data = _table((50, 30, 20))
    train, val = split(data, validation=0.2, seed=0)
    assert isinstance(train, LabeledSubset) and isinstance(val, LabeledSubset)
    assert not set(train.indices) & set(val.indices)
    assert sorted(train.indices + val.indices) == list(range(len(data)))
    assert len(val) == 20
    assert Counter(val.labels) == {0: 10, 1: 6, 2: 4}
    assert train.classes == val.classes == data.classes
    assert train.labels == [data[i][1] for i in train.indices]
    assert [train[i][1] for i in range(len(train))] == train.labels

    torch.manual_seed(123)  # global RNG state must not matter
    np.random.seed(7)
    again = split(data, validation=0.2, seed=0)
    assert again[0].indices == train.indices and again[1].indices == val.indices
    assert split(data, validation=0.2, seed=1)[1].indices != val.indices


def test_split_rounds_to_the_requested_total_and_keeps_a_training_example():
    data = _table((3, 3, 1))
    train, val = split(data, validation=0.5)
    assert len(val) == 4  # round(7 * 0.5)
    assert Counter(train.labels)[2] == 1  # a lone example stays in training
    _, by_count = split(data, validation=2)
    assert len(by_count) == 2


def test_split_without_stratification():
    data = _table((90, 10))
    train, val = split(data, validation=0.3, stratify=False, seed=3)
    assert len(val) == 30 and len(train) == 70
    assert sorted(train.indices + val.indices) == list(range(100))


def test_split_of_a_subset_keeps_classes():
    data = _table((20, 20))
    train, _ = split(data, 0.5)
    inner_train, inner_val = split(train, 0.5)
    assert inner_train.classes == data.classes
    assert example_sha256(inner_val, 0) == content_sha256(inner_val[0][0])


@pytest.mark.parametrize("validation", [0.0, 1.0, -0.1, 0, 100, "0.2", True])
def test_split_bad_validation(validation):
    with pytest.raises(DataError, match="validation"):
        split(_table((5, 5)), validation=validation)


def test_few_shot_on_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255 / 16)), 0, 255).astype(np.uint8)  # (N, 8, 8)
    data = ArrayDataset(images, digits.target)
    train, rest = few_shot(data, per_class=5, seed=0)
    assert len(train) == 50 and Counter(train.labels) == {c: 5 for c in range(10)}
    assert len(rest) == len(data) - 50
    assert not set(train.indices) & set(rest.indices)
    assert few_shot(data, per_class=5, seed=0)[0].indices == train.indices
    assert few_shot(data, per_class=5, seed=1)[0].indices != train.indices
    batch = collate_images(PRE)([train[i] for i in range(4)])
    assert batch[0].shape == (4, 3, 16, 16)


def test_few_shot_needs_enough_examples():
    with pytest.raises(DataError, match=r"needs 4 examples of every class, but '1' has 3"):
        few_shot(_table((10, 3)), per_class=4)
    with pytest.raises(DataError, match="per_class must be a whole number >= 1"):
        few_shot(_table((10, 3)), per_class=0)


def test_splits_are_the_same_in_another_process(photos):
    code = ("import sys; from graft.data import ImageFolder, split; "
            "d = ImageFolder(sys.argv[1]); t, v = split(d, 0.4, seed=5); "
            "print([p.name for p, _ in d.samples], t.indices, v.indices)")
    env = env_with_src()
    env["PYTHONHASHSEED"] = "12345"
    out = subprocess.run([sys.executable, "-c", code, str(photos)], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout.strip()
    data = ImageFolder(photos)
    train, val = split(data, 0.4, seed=5)
    assert out == f"{[p.name for p, _ in data.samples]} {train.indices} {val.indices}"


# --------------------------------------------------------------------------------------------
# Collation


def test_module_collate_images_matches_the_module(photos, image_module_dir):
    module = graft.load(image_module_dir)
    data = ImageFolder(photos)
    collate = module_collate(module, "features")
    loader = DataLoader(data, batch_size=3, collate_fn=collate)
    inputs, labels = next(iter(loader))
    assert inputs.shape == (3, 3, 16, 16) and labels.dtype == torch.int64
    assert labels.tolist() == [0, 0, 0]
    raw = [data[i][0] for i in range(3)]
    torch.testing.assert_close(module.call("features", inputs), module.call("features", raw),
                               rtol=0, atol=0)
    # a view works too, and so does the default signature
    assert module_collate(module.signature("features")).input_names == ["images"]


def test_module_collate_stacks_tensors_and_rejects_mixtures(image_module_dir):
    module = graft.load(image_module_dir)
    collate = module_collate(module)
    inputs, labels = collate([(torch.ones(3, 16, 16), 1), (torch.zeros(3, 16, 16), 0)])
    assert inputs.shape == (2, 3, 16, 16) and labels.tolist() == [1, 0]
    with pytest.raises(DataError, match="different shapes"):
        collate([(torch.ones(3, 16, 16), 1), (torch.zeros(3, 8, 8), 0)])
    with pytest.raises(DataError, match="cannot preprocess an example"):
        collate([(np.zeros((4, 4, 7), np.uint8), 0)])
    with pytest.raises(DataError, match="empty batch"):
        collate([])
    with pytest.raises(SignatureError, match="no signature 'nope'"):
        module_collate(module, "nope")


def test_module_collate_text(tmp_path, text_module_dir, tokenizer_json):
    module = graft.load(text_module_dir)
    path = tmp_path / "t.csv"
    path.write_text("text,label\nthe cat sat,pets\ndog,pets\nthe,other\n")
    data = TextTable(path)
    inputs, labels = module_collate(module, "embed")([data[i] for i in range(3)])
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert inputs["input_ids"].tolist() == [[2, 3, 4], [5, 0, 0], [2, 0, 0]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert labels.tolist() == [1, 1, 0]
    torch.testing.assert_close(module.call("embed", **inputs), module.call("embed", data.texts))
    standalone = collate_text(tokenizer_json, max_length=4)([data[0]])
    assert standalone[0]["input_ids"].tolist() == [[2, 3, 4]]
    with pytest.raises(DataError, match="no image preprocessing"):
        module_transform(module, "embed")


def test_content_sha256_is_by_content():
    pixels = _pixels(1)
    assert content_sha256("abc") != content_sha256(b"abc")
    assert content_sha256(Image.fromarray(pixels)) == content_sha256(Image.fromarray(pixels))
    assert content_sha256(pixels) == content_sha256(pixels.copy())
    assert content_sha256(torch.zeros(2)) != content_sha256(torch.zeros(2, dtype=torch.float64))
    assert content_sha256(torch.zeros(2, dtype=torch.bfloat16)) != content_sha256(torch.zeros(1))
    with pytest.raises(DataError, match="cannot compute a content digest of a object"):
        content_sha256(object())
