"""Tensor-level blobs (design for issue 10): what they would save, and what reading from them costs.

Run: ``.venv/bin/python bench/tensor_store.py`` (``--quick`` for fewer repeats). In one run, on
this machine, in a private store:

1. Store growth when a head-only child of a small CNN is added: measured for today's store
   (one blob per file, so the child's ``weights.safetensors`` is a new blob holding every
   backbone tensor again), and computed exactly for tensor-level blobs (a blob per tensor,
   keyed by the sha256 the manifest records, plus the safetensors header): only tensors whose
   sha256 the parent does not have are new.
2. The weights step of ``graft.load``: today's ``safetensors.load_file`` of one file, against
   a prototype reader that builds each tensor from its own blob file (``open`` + ``read`` +
   ``torch.frombuffer``), for the small CNN and for a 20 MB model of 300 tensors. The
   prototype is this benchmark's, not the store's: the store keeps file-level blobs.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool,
           "F64": torch.float64}


class SmallCNN(torch.nn.Module):
    """Four conv blocks with batch norm, then a 10-class head: 0.4 M parameters."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for cin, cout in ((3, 32), (32, 64), (64, 128), (128, 256)):
            layers += [torch.nn.Conv2d(cin, cout, 3, padding=1, stride=2),
                       torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]
        self.backbone = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(256, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).mean(dim=(2, 3)))


class ManyTensors(torch.nn.Module):
    """150 linear layers of 128x256: 300 tensors, 19.7 MB (EfficientNet-Lite0 has ~300)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(256, 128) for _ in range(150))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(layer(x) for layer in self.layers)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _disk_bytes(root: Path) -> int:
    """Bytes of the distinct files under ``root`` (hard links counted once)."""
    seen, total = set(), 0
    for path in root.rglob("*"):
        st = path.lstat()
        if path.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def _split(path: Path) -> tuple[int, dict[str, tuple[str, list[int], int, int]]]:
    """The header length and name -> (dtype, shape, start, end) of a safetensors file."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header.pop("__metadata__", None)
    return 8 + length, {k: (v["dtype"], v["shape"], *v["data_offsets"]) for k, v in
                        header.items()}


def growth(repeats: int) -> None:
    import graft
    from graft.hub.store import Store

    torch.manual_seed(0)
    parent = SmallCNN().eval()
    x = torch.randn(2, 3, 32, 32)
    graft.save(parent, "cnn@1.0.0", example_inputs=(x,))
    store = Store()
    before = _disk_bytes(store.root / "blobs")
    child = SmallCNN().eval()
    child.load_state_dict(parent.state_dict())
    torch.nn.init.normal_(child.head.weight)  # a new head, the backbone unchanged
    graft.save(child, "cnn-child@1.0.0", example_inputs=(x,))
    after = _disk_bytes(store.root / "blobs")

    p_manifest = store.resolve("cnn").manifest()
    c_stored = store.resolve("cnn-child")
    c_manifest = c_stored.manifest()
    have = {e.sha256 for e in p_manifest.tensors.values()}
    header, layout = _split(c_stored.path / "weights.safetensors")
    new_tensor_bytes = sum(end - start for name, (_, _, start, end) in layout.items()
                           if c_manifest.tensors[name].sha256 not in have)
    other_new = sum(e.size for rel, e in c_manifest.files.items()
                    if rel != "weights.safetensors"
                    and e.sha256 not in {f.sha256 for f in p_manifest.files.values()})
    weights = c_manifest.files["weights.safetensors"].size
    print(f"store growth when a head-only child of a {weights / 1e6:.2f} MB CNN is added:")
    print(f"  file-level blobs (today), measured on disk       {after - before:>10,} bytes")
    print(f"  tensor-level blobs, computed exactly               "
          f"{other_new + header + new_tensor_bytes:>10,} bytes "
          f"(header {header:,} + new tensors {new_tensor_bytes:,} + other files "
          f"{other_new:,})")
    print(f"  of which the weights: {weights:,} bytes today, "
          f"{header + new_tensor_bytes:,} with tensor blobs")


def reading(label: str, model: torch.nn.Module, repeats: int, workdir: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = workdir / f"{label}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    header, layout = _split(path)
    blobs = workdir / f"{label}-blobs"
    blobs.mkdir()
    data = path.read_bytes()
    names = {}
    for name, (dtype, shape, start, end) in layout.items():
        chunk = data[header + start:header + end]
        digest = hashlib.sha256(chunk).hexdigest()
        (blobs / digest).write_bytes(chunk)
        names[name] = (digest, dtype, shape)

    def from_blobs() -> dict[str, torch.Tensor]:
        out = {}
        for name, (digest, dtype, shape) in names.items():
            with open(blobs / digest, "rb") as f:
                raw = bytearray(f.read())
            out[name] = torch.frombuffer(raw, dtype=_DTYPES[dtype]).reshape(shape)
        return out

    reference = load_file(str(path))
    assert all(torch.equal(reference[k], v) for k, v in from_blobs().items())
    one = _median_ms(lambda: load_file(str(path)), repeats)
    many = _median_ms(from_blobs, repeats)
    print(f"{label}: {len(layout)} tensors, {len(data) / 1e6:.1f} MB, median of {repeats}")
    print(f"  safetensors load_file of one file (today)          {one:8.2f} ms   1.00x")
    print(f"  one blob file per tensor (prototype)               {many:8.2f} ms "
          f"{many / one:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 5 if args.quick else 15
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GRAFT_HOME"] = str(Path(tmp) / "home")
        growth(repeats)
        print()
        reading("small-cnn", SmallCNN(), repeats, Path(tmp))
        reading("300-tensors", ManyTensors(), repeats, Path(tmp))


if __name__ == "__main__":
    main()
