"""Save-time and size benchmark: ``graft.save`` against what a user would otherwise write.

Run: ``.venv/bin/python bench/save.py`` (``--repeats N``, default 3; ``--quick`` is 1).
Prints, for three architectures of the export corpus (``tests/export/corpus.py``), the median
wall time and the size on disk of:

1. ``graft.save`` with the plainest call (eval + train programs, dynamic batch and sequence,
   every program checked against the eager model, reference outputs written);
2. ``torch.export.export`` (eval only, same dynamic dimensions) + ``torch.export.save`` to a
   ``.pt2`` archive: a graph without the train variant, the fidelity check or the manifest;
3. ``model.save_pretrained`` (``transformers``' own safetensors state dict plus config): no
   graph at all, so loading it needs the model's code.

Ratios are against the ``torch.export`` row. All figures come from one run on this machine.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A text encoder, a decoder with a tied LM head, a vision transformer. (The tiny random
# ResNet's backward runs on subnormal floats, which times the CPU's slow path, not Graft.)
ARCHITECTURES = ("bert", "gpt2-lm", "vit")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _measure(write: Callable[[Path], None], workdir: Path, repeats: int,
             suffix: str) -> tuple[float, int]:
    """Median seconds of ``write(fresh path)``, and the size of what it wrote."""
    times, size = [], 0
    for i in range(repeats):
        target = workdir / f"out-{i}{suffix}"
        gc.collect()
        start = time.perf_counter()
        write(target)
        times.append(time.perf_counter() - start)
        size = _size(target)
        shutil.rmtree(target, ignore_errors=True)
        if target.exists():
            target.unlink()
    return statistics.median(times), size


def _plain_call(entry: Any, model: torch.nn.Module) -> dict[str, Any]:
    """The arguments of the plainest graft.save call for a corpus entry."""
    names = [p for p in inspect.signature(model.forward).parameters][: len(entry.args)]
    examples = dict(zip(names, entry.args)) | dict(entry.kwargs)
    specs = {}
    for name, x in examples.items():
        dims = entry.dynamic.get(name, {})
        shape = ",".join(dims.get(a, str(s)) for a, s in enumerate(x.shape))
        specs[name] = f"{str(x.dtype).removeprefix('torch.')}[{shape}]"
    return {"example_inputs": entry.args, "example_kwargs": dict(entry.kwargs),
            "inputs": specs}


def bench(name: str, repeats: int, workdir: Path) -> None:
    import graft
    from torch.export import Dim

    from tests.export.corpus import by_name

    entry = by_name(name)
    model = entry.build()
    call = _plain_call(entry, model)

    def graft_save(target: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", graft.errors.SaveWarning)
            graft.save(model, target, name=name, version="1", **call)

    def export_save(target: Path) -> None:
        dims: dict[str, Any] = {}
        dynamic = {k: {a: dims.setdefault(d, Dim.DYNAMIC) for a, d in
                       entry.dynamic.get(k, {}).items()} or None for k in call["inputs"]}
        ep = torch.export.export(model.eval(), entry.args, dict(entry.kwargs),
                                 dynamic_shapes=dynamic, strict=False)
        torch.export.save(ep, str(target))

    def save_pretrained(target: Path) -> None:
        model.save_pretrained(str(target))

    params = sum(p.numel() for p in model.parameters())
    print(f"\n{name} ({type(model).__name__}, {params / 1e3:.1f} k parameters)")
    rows = [("torch.export.export + torch.export.save (eval only)", export_save, ".pt2"),
            ("graft.save (eval + train, checked)", graft_save, ""),
            ("model.save_pretrained (weights + config, no graph)", save_pretrained, "")]
    results = [(label, *_measure(fn, workdir, repeats, suffix)) for label, fn, suffix in rows]
    base_s, base_bytes = results[0][1], results[0][2]
    for label, seconds, size in results:
        print(f"  {label:<54} {seconds * 1000:8.0f} ms {seconds / base_s:5.2f}x   "
              f"{size / 1024:8.1f} KiB {size / base_bytes:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repeat")
    options = parser.parse_args()
    repeats = 1 if options.quick else max(1, options.repeats)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("GRAFT_HOME", str(Path(tmp) / "home"))
        print(f"graft.save vs torch.export vs save_pretrained, median of {repeats} "
              f"(torch {torch.__version__})")
        for name in ARCHITECTURES:
            bench(name, repeats, Path(tmp))


if __name__ == "__main__":
    main()
