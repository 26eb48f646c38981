"""What verify-on-read costs: the store's checks on every load, for a small and a 20 MB module.

Run: ``.venv/bin/python bench/store.py`` (``--quick`` for fewer repeats). Prints medians and
ratios measured in one run, on this machine, in a private store:

1. ``Store.open`` (the check every ``graft.load`` from the store runs) under three policies:
   sizes only (what the store did before: no hashing at all), the current one (graft.json,
   programs and assets hashed, weights trusted by their fingerprint), and the same with the
   fingerprint invalidated before each run (the weights hashed too, as on the first load
   after an add or a change); and ``Store.verify`` (everything hashed).
2. ``graft.load`` end to end with a trusted and with an invalidated fingerprint, against
   building the model from code and ``load_state_dict`` from a safetensors file (the baseline
   a user would pick).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_ms(fn: Callable[[], object], repeats: int,
               setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _row(label: str, ms: float, base: float) -> str:
    return f"  {label:<62} {ms:9.2f} ms   {ms / base:6.2f}x"


class Wide(torch.nn.Module):
    """Five 1024x1024 linear layers: 5.2 M parameters, 21 MB of float32 weights."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024) for _ in range(5)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def bench(label: str, make: Callable[[], torch.nn.Module], example: torch.Tensor,
          repeats: int, workdir: Path) -> None:
    import graft
    from graft.hub.handles import parse_handle
    from graft.hub.store import Store
    from graft.hub.trees import check_tree
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = make().eval()
    name = label.split()[0].lower()
    graft.save(model, f"{name}@1.0.0", example_inputs=(example,))
    store = Store()
    stored = store.resolve(name)
    weights = workdir / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    # A fingerprint vouches for a file only once its last change is 2 s old (docs/store.md).
    time.sleep(2.1)
    store.open(name)  # records a fingerprint that now vouches for the weights

    def invalidate() -> None:
        with closing(sqlite3.connect(store.root / "index.sqlite")) as conn:
            conn.execute("UPDATE files SET checked_ns = NULL WHERE module = ?",
                         (stored.digest,))
            with contextlib.suppress(sqlite3.OperationalError):  # a store before tensor blobs
                conn.execute("DELETE FROM blob_checks")
            conn.commit()

    def sizes_only() -> None:
        # What Store.open did before: find the row, check graft.json's digest and the sizes.
        found = store._find(parse_handle(name))
        check_tree(found.path, found.digest, {}, level="sizes", blob_file=store.blob_file)

    def from_code() -> torch.nn.Module:
        m = make()
        m.load_state_dict(load_file(str(weights)))
        return m.eval()

    mb = stored.size / 2**20
    print(f"\n{label}: {mb:.1f} MB in {len(stored.manifest().files)} files, median of "
          f"{repeats}")
    base = _median_ms(sizes_only, repeats)
    print(_row("Store.open, sizes only (the old policy; baseline)", base, base))
    print(_row("Store.open, weights trusted by fingerprint (default)",
               _median_ms(lambda: store.open(name), repeats), base))
    print(_row("Store.open, fingerprint invalidated: weights hashed",
               _median_ms(lambda: store.open(name), repeats, setup=invalidate), base))
    print(_row("Store.verify (everything hashed)",
               _median_ms(lambda: store.verify(name), repeats), base))
    store.open(name)  # trusted again (the file is old enough now)
    code = _median_ms(from_code, repeats)
    print(_row("code + safetensors load_state_dict (baseline)", code, code))
    print(_row("graft.load, weights trusted by fingerprint (default)",
               _median_ms(lambda: graft.load(name), repeats), code))
    print(_row("graft.load, fingerprint invalidated: weights hashed",
               _median_ms(lambda: graft.load(name), repeats, setup=invalidate), code))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 5 if args.quick else 15
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from tests.conftest import TinyCNN

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GRAFT_HOME"] = str(Path(tmp) / "home")  # a private store
        bench("TinyCNN (2 conv + batch norm)", TinyCNN, torch.randn(2, 3, 16, 16), repeats,
              Path(tmp))
        bench("Wide (5 x Linear(1024, 1024))", Wide, torch.randn(2, 1024), repeats, Path(tmp))


if __name__ == "__main__":
    main()
