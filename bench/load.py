"""Load-time and latency benchmark: this Graft against an earlier one and against plain PyTorch.

Run: ``.venv/bin/python bench/load.py`` (``--quick`` for fewer repeats, ``--before REV`` for
the revision to compare with, default ``HEAD``; ``--no-before`` to skip it; ``--rounds N``
turns per tree, default 3). Prints medians and minimums measured in one run, on this machine:

1. For the tiny CNN of the tests, EfficientNet-Lite0 and MiniLM, each from a warm store:
   ``graft.load`` (wall clock, and the process's CPU time, which other processes on a busy
   machine do not inflate; also back to back, without the full garbage collection that
   precedes every other sample), ``graft.load`` + the first call (which reads, validates and
   builds the program), and a steady call, for this tree and for ``REV``. ``REV``'s files are unpacked
   with ``git archive`` into a temporary folder and measured by the same code in its own
   process, with its own store.
2. EfficientNet-Lite0: ``graft.load`` against building the model from code and
   ``load_state_dict`` from safetensors (the path a user would otherwise take), and the cost
   of the entry check (``check_module``: hashes, pickle scan, complete program validation).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


def _samples_ms(fn: Callable[[], object], repeats: int,
                cpu: list[float] | None = None, *, collect: bool = True) -> list[float]:
    """Wall-clock times (ms) of ``repeats`` calls, each after a full garbage collection
    unless ``collect`` is false; with ``cpu``, the process's CPU time of each is appended
    there (what other processes on the machine do not add to)."""
    times = []
    for _ in range(repeats):
        if collect:
            gc.collect()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - start) * 1000)
        if cpu is not None:
            cpu.append((time.process_time() - start_cpu) * 1000)
    return times


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(_samples_ms(fn, repeats))


# -- measuring one tree (runs in a child process whose sys.path starts at that tree's src) ---


def _models() -> dict[str, tuple[Callable[[], str], Any]]:
    import torch

    import graft
    import graft.zoo

    def tiny() -> str:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import TinyCNN

        torch.manual_seed(0)
        try:
            graft.load("tiny-cnn@1.0.0")
        except graft.ModuleNotFound:
            graft.save(TinyCNN().eval(), "tiny-cnn@1.0.0",
                       example_inputs=(torch.randn(2, 3, 16, 16),))
        return "tiny-cnn@1.0.0"

    def zoo(name: str) -> Callable[[], str]:
        def make() -> str:
            graft.zoo.import_module(name)
            return f"{name}@1.0.0"
        return make

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (1, 16), generator=gen)
    return {
        "tiny CNN": (tiny, (torch.randn(1, 3, 16, 16, generator=gen),)),
        "EfficientNet-Lite0": (zoo("efficientnet-lite0"),
                               (torch.randn(1, 3, 224, 224, generator=gen),)),
        "MiniLM-L6": (zoo("minilm-l6"), (ids, torch.ones_like(ids))),
    }


def measure(repeats: int) -> dict[str, dict[str, list[float]]]:
    """load / first call / steady call times (ms) of each model, in this process's Graft."""
    import torch

    import graft

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = {}
    for label, (make, inputs) in _models().items():
        handle = make()
        # The store trusts a weights fingerprint only when its hash was taken at least 2 s
        # after the file last changed (docs/store.md); until then every load re-hashes. Wait
        # that out once, so the rows measure the steady state a user's later loads see.
        time.sleep(2.1)
        graft.load(handle)  # records the fingerprint; warms the page cache and lazy imports

        def first_call() -> object:
            with torch.no_grad():
                return graft.load(handle)(*inputs)

        module = graft.load(handle)
        with torch.no_grad():
            module(*inputs)
            steady = _samples_ms(lambda: module(*inputs), repeats * 3)
        torch.set_num_threads(1)  # a load runs on one thread: its CPU time is its cost
        load_cpu: list[float] = []
        load = _samples_ms(lambda: graft.load(handle), repeats, load_cpu)
        back_to_back: list[float] = []  # no collection between: caches stay warm
        _samples_ms(lambda: graft.load(handle), repeats * 4, back_to_back, collect=False)
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        results[label] = {"load": load, "load, CPU time": load_cpu,
                          "load, CPU, back to back": back_to_back,
                          "first call": _samples_ms(first_call, repeats),
                          "steady call": steady}
    return results


def _child(src: Path, home: Path, repeats: int) -> dict[str, dict[str, list[float]]]:
    env = dict(os.environ, PYTHONPATH=str(src), GRAFT_HOME=str(home))
    out = subprocess.run([sys.executable, __file__, "--measure", str(repeats)], env=env,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _worktree(rev: str) -> Path:
    """The files of ``rev`` in a temporary folder keyed by its commit (git state untouched)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", rev + "^{commit}"],
                            check=True, capture_output=True, text=True).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"graft-bench-{commit[:12]}"
    if not (path / "src" / "graft").is_dir():
        staging = Path(tempfile.mkdtemp(prefix="graft-bench-"))
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(staging)], input=archive, check=True)
        os.replace(staging, path)
    return path


# -- the program runner alone, before and after, interleaved in one process -----------------


def programs_interleaved(before: Path, repeats: int) -> None:
    """Build (read, validate, compile) and steady-call one eval program with both runners.

    Run in turns in one process over the same bytes and tensors, so machine load affects both
    alike; the minimum is reported beside the median because other processes only add time.
    """
    import importlib.util

    import torch

    import graft

    # The runner moved from module/ to runtime/ when the layers were split.
    path = before / "src" / "graft" / "runtime" / "program.py"
    if not path.exists():
        path = before / "src" / "graft" / "module" / "program.py"
    spec = importlib.util.spec_from_file_location("graft_before_program", path)
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old  # dataclasses look their module up while being created
    spec.loader.exec_module(old)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (1, 16), generator=gen)
    cases = [("tiny CNN", "tiny-cnn", "forward", [torch.randn(1, 3, 16, 16, generator=gen)]),
             ("EfficientNet-Lite0", "efficientnet-lite0", "classify",
              [torch.randn(1, 3, 224, 224, generator=gen)]),
             ("MiniLM-L6", "minilm-l6", "embed", [ids, torch.ones_like(ids)])]
    print(f"\nprograms alone, eval variant, one thread, the two runners in turns x"
          f"{repeats * 3}: min / median ms")
    print(f"  {'model / step':<32}{'before (fx code)':>22}{'after (interpreter)':>22}")
    for label, handle, name, inputs in cases:
        module = graft.load(handle)
        new, constants = module._program(name, "eval")
        data = (module.directory / module.manifest.signatures[name].programs["eval"]).read_bytes()
        state = module._state()
        olds = old.program_from_json(data, name="before")
        times: dict[str, list[float]] = {"b build": [], "a build": [], "b call": [], "a call": []}
        with torch.no_grad():
            torch.testing.assert_close(new(state, constants, inputs)[0],
                                       olds(state, constants, inputs)[0], rtol=0, atol=0)
            for _ in range(repeats * 3):
                for key, fn in (("b build", lambda: old.program_from_json(data, name="b")),
                                ("a build", lambda: _new_program(data)),
                                ("b call", lambda: olds(state, constants, inputs)),
                                ("a call", lambda: new(state, constants, inputs))):
                    start = time.perf_counter()
                    fn()
                    times[key].append((time.perf_counter() - start) * 1000)
        for step, b, a in (("build", "b build", "a build"), ("steady call", "b call", "a call")):
            cells = [f"{min(times[k]):9.2f} / {statistics.median(times[k]):8.2f}" for k in (b, a)]
            print(f"  {label + ' ' + step:<32}" + "".join(f"{c:>22}" for c in cells))


def _new_program(data: bytes) -> object:
    from graft.runtime.program import program_from_json

    return program_from_json(data, name="after", train=False)


# -- EfficientNet against code + safetensors ------------------------------------------------


def efficientnet_baseline(repeats: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    import graft
    import graft.zoo
    from graft.format.manifest import Manifest
    from graft.format.validate import check_module
    from graft.hub.store import Store
    from graft.zoo.efficientnet import EfficientNetLite0

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    stored = graft.zoo.import_module("efficientnet-lite0")
    module = graft.load("efficientnet-lite0")
    weights = Path(tempfile.mkdtemp()) / "efficientnet-lite0.safetensors"
    save_file({k.removeprefix("weights."): v.contiguous()
               for k, v in module.state_dict().items()}, str(weights))

    def from_code() -> torch.nn.Module:
        m = EfficientNetLite0()
        m.load_state_dict(load_file(str(weights)))
        return m.eval()

    base = _median_ms(from_code, repeats)
    load = _median_ms(lambda: graft.load("efficientnet-lite0"), repeats)
    # The entry check runs on a module directory (a store tree keeps tensors as blobs).
    with Store().exported(stored.pinned_handle) as directory:
        manifest = Manifest.read(directory)
        check = _median_ms(lambda: check_module(directory, manifest, hash_contents=True),
                           repeats)
    print("\nEfficientNet-Lite0 (4.65 M parameters), warm store, median of", repeats)
    print(f"  {'code + safetensors load_state_dict (baseline)':<52} {base:8.1f} ms   1.00x")
    label = "graft.load('efficientnet-lite0')"
    print(f"  {label:<52} {load:8.1f} ms   {load / base:4.2f}x")
    print(f"  {'check_module (entry check: hashes, scan, programs)':<52} {check:8.1f} ms   "
          f"{check / base:4.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--before", default="HEAD", help="revision to compare with")
    parser.add_argument("--no-before", action="store_true", help="measure this tree only")
    parser.add_argument("--rounds", type=int, default=3,
                        help="turns each tree takes (a child process each)")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    repeats = 5 if args.quick else 15
    # Fresh stores for every run: a store kept from an earlier run holds trees in the layout
    # of the code that wrote them (whole weights files, say), and would measure that instead.
    homes = Path(tempfile.mkdtemp(prefix="graft-bench-homes-"))
    try:
        _run(args, repeats, homes)
    finally:
        shutil.rmtree(homes, ignore_errors=True)


def _run(args: argparse.Namespace, repeats: int, homes: Path) -> None:
    trees = {"after": ROOT}
    if not args.no_before:
        trees = {f"before ({args.before})": _worktree(args.before), **trees}
    # The trees take turns, a child process each, for several rounds: a machine whose load
    # drifts during the run then weighs on both alike, not on whichever tree ran last.
    results: dict[str, dict[str, dict[str, list[float]]]] = {label: {} for label in trees}
    for _ in range(args.rounds):
        for label, tree in trees.items():
            for model, steps in _child(tree / "src", homes / label.split()[0], repeats).items():
                for step, times in steps.items():
                    results[label].setdefault(model, {}).setdefault(step, []).extend(times)
    labels = list(results)
    print(f"graft.load from a warm store, ms over {args.rounds} rounds of {repeats} (steady "
          f"call: {repeats * 3}) per tree, the trees in turns, no grad: median / min")
    print(f"  {'model / step':<42}" + "".join(f"{label:>20}" for label in labels)
          + ("   after/before (median)" if len(labels) == 2 else ""))
    for model in results[labels[-1]]:
        for step in ("load", "load, CPU time", "load, CPU, back to back", "first call",
                     "steady call"):
            values = [results[label][model][step] for label in labels]
            medians = [statistics.median(v) for v in values]
            ratio = f"{medians[1] / medians[0]:15.2f}x" if len(values) == 2 else ""
            print(f"  {model + ' ' + step:<42}"
                  + "".join(f"{statistics.median(v):11.1f} /{min(v):6.1f}" for v in values)
                  + ratio)
    os.environ["GRAFT_HOME"] = str(homes / "after")
    sys.path.insert(0, str(ROOT / "src"))
    if not args.no_before:
        programs_interleaved(trees[labels[0]], repeats)
    efficientnet_baseline(repeats)


if __name__ == "__main__":
    main()
