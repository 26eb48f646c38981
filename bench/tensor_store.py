"""Tensor-level blobs in the store (issue 10): what they save, and what reading from them costs.

Run: ``.venv/bin/python bench/tensor_store.py`` (``--quick`` for fewer repeats). In one run, on
this machine, in a private store:

1. Store growth when a head-only child of a small CNN is added, measured on disk (hard links
   counted once), against the child's whole ``weights.safetensors`` (what a store of one blob
   per file adds at least).
2. The weights step of ``graft.load`` from the store (each tensor read from its own blob into
   a fresh allocation: ``graft.runtime.load._read_blobs``) against what it replaced
   (``safetensors.load_file`` of one file, then a clone per tensor), for the small CNN (30
   tensors) and a 20 MB model of 300 tensors: the per-blob overhead that would decide
   grouping small tensors.
3. With ``--load-against SRC`` (the ``src`` folder of another Graft, e.g. this tree without
   tensor-level storage): ``graft.load`` from a warm store for the models of bench/load.py,
   this tree against that one, in child processes that alternate (A B A B ...), each with
   its own store; the best median of each tree is compared, so a busy machine slows both.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
    c_manifest = store.resolve("cnn-child").manifest()
    weights = p_manifest.files["weights.safetensors"].size
    have = {e.sha256 for e in p_manifest.tensors.values()}
    new = [n for n, e in c_manifest.tensors.items() if e.sha256 not in have]
    print(f"store growth when a head-only child of a {weights / 1e6:.2f} MB CNN is added "
          f"(parent: {p_manifest.size:,} bytes in its files):")
    print(f"  tensor-level store, measured on disk   {after - before:>10,} bytes "
          f"({(after - before) / p_manifest.size:.1%} of the parent; new tensors: "
          f"{', '.join(new)})")
    print(f"  a file-level store would add at least  {weights:>10,} bytes (the child's whole "
          f"weights.safetensors)")


def reading(label: str, model: torch.nn.Module, repeats: int, workdir: Path) -> None:
    """The weights step of graft.load from the store (one blob per tensor, read into fresh
    allocations) against what it replaced: safetensors load_file of one file, then a clone
    of every tensor (the loader's own allocation per tensor)."""
    import graft
    from graft.hub.store import Store
    from graft.runtime.load import _read_blobs
    from safetensors.torch import load_file

    graft.save(model.eval(), f"{label}@1.0.0", example_inputs=(_example(model),))
    store = Store()
    stored, manifest = store.open(label)
    blobs = store.tensor_blobs(stored, manifest)
    out = workdir / label
    store.export(label, out)
    path = out / "weights.safetensors"
    reference = load_file(str(path))
    assert all(torch.equal(reference[k], v) for k, v in _read_blobs(manifest, blobs).items())
    one = _median_ms(lambda: {k: v.clone() for k, v in load_file(str(path)).items()},
                     repeats)
    many = _median_ms(lambda: _read_blobs(manifest, blobs), repeats)
    print(f"{label}: {len(manifest.tensors)} tensors, {path.stat().st_size / 1e6:.1f} MB, "
          f"median of {repeats}")
    print(f"  load_file of one file + clone (before)             {one:8.2f} ms   1.00x")
    print(f"  one blob per tensor, read into place (store now)   {many:8.2f} ms "
          f"{many / one:6.2f}x   ({(many - one) / len(manifest.tensors) * 1000:+.1f} us "
          "per tensor)")


def _example(model: torch.nn.Module) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32) if isinstance(model, SmallCNN) else torch.randn(2, 256)


def _load_child(mode: str) -> None:
    """In a child process: import bench/load.py's models into $GRAFT_HOME (``setup``), or
    print the median and minimum of 15 warm loads of each (``measure``)."""
    import json

    sys.path.insert(0, str(ROOT / "bench"))
    import load as bench_load

    import graft

    torch.set_num_threads(1)
    out = {}
    for label, (make, _) in bench_load._models().items():
        handle = make()
        if mode == "measure":
            graft.load(handle)
            times = []
            for _ in range(15):
                start = time.perf_counter()
                graft.load(handle)
                times.append((time.perf_counter() - start) * 1000)
            out[label] = (statistics.median(times), min(times))
    print(json.dumps(out))


def load_against(other: Path, rounds: int) -> None:
    import json
    import subprocess

    trees = {"other": other.resolve(), "this": ROOT / "src"}
    homes = Path(tempfile.mkdtemp(prefix="graft-bench-tensor-store-"))

    def child(label: str, mode: str) -> dict[str, list[float]]:
        env = dict(os.environ, PYTHONPATH=str(trees[label]), GRAFT_HOME=str(homes / label))
        done = subprocess.run([sys.executable, __file__, "--child", mode], env=env,
                              check=True, capture_output=True, text=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    for label in trees:
        child(label, "setup")
    time.sleep(2.5)  # a fingerprint vouches only for a blob unchanged for 2 s
    runs: dict[str, list[dict[str, list[float]]]] = {"other": [], "this": []}
    for _ in range(rounds):
        for label in trees:
            runs[label].append(child(label, "measure"))
    print(f"graft.load from a warm store, best of {rounds} medians of 15 loads, child "
          f"processes alternating; other = {other}")
    for model in runs["this"][0]:
        a = min(r[model][0] for r in runs["other"])
        b = min(r[model][0] for r in runs["this"])
        print(f"  {model:<22} other {a:8.1f} ms   this {b:8.1f} ms   {b / a:5.2f}x")
    import shutil

    shutil.rmtree(homes, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--load-against", type=Path, metavar="SRC",
                        help="also compare graft.load with the Graft in SRC")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _load_child(args.child)
        return
    repeats = 5 if args.quick else 15
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GRAFT_HOME"] = str(Path(tmp) / "home")
        growth(repeats)
        print()
        reading("small-cnn", SmallCNN(), repeats, Path(tmp))
        reading("many-tensors", ManyTensors(), repeats, Path(tmp))
    if args.load_against:
        print()
        load_against(args.load_against, 2 if args.quick else 4)


if __name__ == "__main__":
    main()
