"""Shared fixtures: an isolated store per test, and tiny deterministic models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def graft_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty store, so no test sees another's modules."""
    home = tmp_path_factory.mktemp("graft-home")
    monkeypatch.setenv("GRAFT_HOME", str(home))
    return home


class TinyCNN(nn.Module):
    """Two conv layers with batch norm and dropout: exercises both program variants."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(images)))  # (B, 8, H, W)
        x = torch.relu(self.bn2(self.conv2(x)))  # (B, 8, H/2, W/2)
        return x.mean(dim=(2, 3))  # (B, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(images)))


class TinyTransformer(nn.Module):
    """Embedding, one self-attention block with dropout, masked mean pooling."""

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(32, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=0.1, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, dim))
        self.norm2 = nn.LayerNorm(dim)

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos[:seq]  # (B, T, D)
        pad = attention_mask == 0
        attended, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)
        x = self.norm1(x + attended)
        return self.norm2(x + self.ff(x))  # (B, T, D)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.token_states(input_ids, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, D)


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN()
    # Non-trivial running statistics, so eval differs from a fresh model.
    model.bn1.running_mean.uniform_(-0.5, 0.5)
    model.bn1.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def tiny_transformer() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def token_batch(batch: int = 3, seq: int = 7, vocab: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, seq - 2:] = 0
    return ids, mask


def env_with_src() -> dict[str, str]:
    """Environment for subprocesses: the source tree importable, the same store."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


#: The word-level vocabulary of the tiny tokenizer the text tests use.
WORDS = ("[PAD]", "[UNK]", "the", "cat", "sat", "dog")


def write_word_tokenizer(path: Path, words: tuple[str, ...] = WORDS) -> Path:
    """Write a whitespace, word-level ``tokenizer.json`` (``[PAD]`` 0, ``[UNK]`` 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


class BagOfWords(nn.Module):
    """Masked mean of word embeddings: a tiny text encoder, (B, T) ids -> (B, dim)."""

    def __init__(self, vocab: int = len(WORDS), dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
        return (self.embed(input_ids) * mask).sum(1) / mask.sum(1)  # (B, dim)


class Pool(nn.Module):
    """One conv layer and global average pooling: a tiny image encoder, 4-d features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(images)).mean(dim=(2, 3))  # (B, 4)


def write_image_folder(data, root: Path) -> Path:
    """Write a labelled dataset of uint8 HWC arrays as PNGs, one sub-folder per class."""
    from PIL import Image

    for i in range(len(data)):
        image, label = data[i]
        folder = root / data.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    return root


@pytest.fixture
def one_thread():
    """Run on one thread: tiny models are faster so, and a busy machine slows them less."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
