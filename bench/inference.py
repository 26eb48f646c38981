"""Inference benchmark: ONNX Runtime (from `graft export onnx`) vs torch eager vs torch.compile.

Run: ``.venv/bin/python bench/inference.py`` (``--quick`` for fewer repeats, ``--browser`` to
also time the exported page in headless Chromium). One run on this machine, medians of
repeated calls after a warm-up, batch 1 and 32, for

- EfficientNet-Lite0 ``classify`` (224x224 images), and
- all-MiniLM-L6-v2 ``embed``: batch 1 at 12 tokens (a short sentence or a search query), 32
  and 128 tokens, and batch 32 at 32 tokens; also its int8 export
  (``graft export onnx --quantize int8``), with its size and its distance from PyTorch.

The eager baseline is the model a user would write: Graft's eager architecture with the same
weights (``graft.zoo.efficientnet`` / ``graft.zoo.minilm``), ``torch.no_grad``, eval mode;
``graft.load`` (the module's stored program, run by Graft's runtime) is shown beside it. For
MiniLM the model a user would otherwise pick, sentence-transformers over the same files, is
timed too (its own row; skipped when the package is missing). ORT and torch use the same
number of threads. Ratios are eager time / other time: above 1 means faster than eager.
"""

from __future__ import annotations

import argparse
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


def _interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int,
                         warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of each function, timed in turn (a, b, c, a, b, c, ...).

    Round-robin timing keeps the ratios fair when other work on the machine comes and goes.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - start) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


#: (batch, tokens) rows of each module; tokens is None for images.
_SHAPES = {"efficientnet-lite0": ((1, None), (32, None)),
           "minilm-l6": ((1, 12), (1, 32), (1, 128), (32, 32))}


def _inputs(name: str, batch: int, tokens: int | None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(batch)
    if name == "efficientnet-lite0":
        return (torch.randn(batch, 3, 224, 224, generator=g),)
    assert tokens is not None
    ids = torch.randint(1000, 20000, (batch, tokens), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    return ids, torch.ones(batch, tokens, dtype=torch.int64)


def _sentence_transformers() -> Callable[..., torch.Tensor] | None:
    """all-MiniLM-L6-v2 as sentence-transformers runs it (transformer, mean pooling, L2 norm)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    from graft.zoo import minilm

    model = SentenceTransformer(str(minilm.model_dir()), device="cpu").eval()

    def embed(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        features = {"input_ids": ids, "attention_mask": mask,
                    "token_type_ids": torch.zeros_like(ids)}
        return model(features)["sentence_embedding"]

    return embed


def _eager(name: str) -> Callable[..., torch.Tensor]:
    if name == "efficientnet-lite0":
        from graft.zoo import efficientnet

        model = efficientnet.load_pretrained().eval()
        return model.classify
    from graft.zoo import minilm

    model = minilm.load_pretrained().eval()
    return model.embed


def bench_module(name: str, signature: str, workdir: Path, repeats: int, threads: int) -> dict:
    import graft
    from graft.export.onnx import export_onnx, onnx_session
    from graft.zoo import import_module

    import_module(name)
    module = graft.load(name)
    exported = export_onnx(module, workdir / f"{name}.onnx", signature=signature)
    session = onnx_session(exported.path, threads=threads)
    int8 = None
    if name == "minilm-l6":  # a transformer: its MatMul weights are what int8 shrinks
        int8 = export_onnx(module, workdir / f"{name}.int8.onnx", signature=signature,
                           quantize="int8")
        int8_session = onnx_session(int8.path, threads=threads)
    eager = _eager(name)
    compiled = torch.compile(eager)
    other = _sentence_transformers() if name == "minilm-l6" else None
    input_names = [i.name for i in session.get_inputs()]
    rows: dict[tuple[int, int | None], dict[str, float]] = {}
    for batch, tokens in _SHAPES[name]:
        inputs = _inputs(name, batch, tokens)
        feeds = {k: v.numpy() for k, v in zip(input_names, inputs)}
        count = repeats if batch == 1 else max(3, repeats // 4)
        fns = {
            "torch eager": lambda: eager(*inputs),
            "graft.load (program)": lambda: module.call(signature, *inputs),
            "torch.compile": lambda: compiled(*inputs),
            "ONNX Runtime": lambda: session.run(None, feeds),
        }
        if int8 is not None:
            fns["ONNX Runtime int8"] = lambda: int8_session.run(None, feeds)
        if other is not None:
            fns["sentence-transformers"] = lambda: other(*inputs)
        with torch.no_grad():
            rows[batch, tokens] = _interleaved_medians(fns, count)
    return {"parity": exported.max_abs_diff, "rows": rows,
            "int8": int8.quantization if int8 is not None else None,
            "sizes": [e.path.stat().st_size for e in (exported, int8) if e is not None]}


def bench_browser(workdir: Path, repeats: int, *, isolated: bool) -> dict[str, float]:
    """Time per image in the exported page (ONNX Runtime Web, wasm): one thread from a plain
    static server, or as many as the page takes (up to 4) when served cross-origin isolated,
    as `graft serve` serves its try pages."""
    import functools
    import http.server
    import threading

    import numpy as np
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from graft.export.web import export_web
    from graft.zoo import import_module

    import_module("efficientnet-lite0")
    root = workdir / "site"
    if not root.exists():  # one site for both runs
        export_web("efficientnet-lite0", root)
    photo = workdir / "photo.png"
    Image.fromarray(np.full((300, 451, 3), 128, np.uint8)).save(photo)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                          ".wasm": "application/wasm"}

        def log_message(self, *args: object) -> None:
            pass

        def end_headers(self) -> None:
            if isolated:
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            super().end_headers()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            page.evaluate("window.graftPage.ready")
            for i in range(repeats + 2):
                page.evaluate("window.graftPage.last = null")
                page.set_input_files("#try-file", str(photo))
                page.wait_for_function("window.graftPage.last !== null", timeout=120_000)
            timings = page.evaluate("window.graftPage.timings")[2:]  # after two warm-ups
            threads = page.evaluate("window.graftPage.threads")
            browser.close()
    finally:
        server.shutdown()
    return {"inference": statistics.median(t["inference"] for t in timings),
            "preprocess": statistics.median(t["preprocess"] for t in timings),
            "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--browser", action="store_true", help="also time the page in Chromium")
    parser.add_argument("--browser-only", action="store_true", help="time the page alone")
    parser.add_argument("--threads", type=int, default=None, help="threads for torch and ONNX "
                        "Runtime alike (default: torch's default); 1 gives stable figures on a "
                        "busy machine, where spinning thread pools distort every ratio")
    args = parser.parse_args()
    repeats = 5 if args.quick else 15
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="graft-bench-") as tmp:
        os.environ.setdefault("GRAFT_HOME", str(Path(tmp) / "home"))
        print(f"torch {torch.__version__}, {threads} threads for torch and ONNX Runtime; "
              f"medians of {repeats} calls (batch 32: {max(3, repeats // 4)})")
        ort_batch1 = None
        modules = () if args.browser_only else (("efficientnet-lite0", "classify"),
                                                 ("minilm-l6", "embed"))
        for name, signature in modules:
            result = bench_module(name, signature, Path(tmp), repeats, threads)
            print(f"\n{name}:{signature}  (ONNX vs PyTorch on the reference inputs: max abs "
                  f"difference {result['parity']:.1e})")
            if result["int8"]:
                q = result["int8"]
                print(f"  int8 (`graft export onnx --quantize int8`, {q['matmuls']} MatMul "
                      f"weights, {result['sizes'][1] / 1e6:.1f} MB against "
                      f"{result['sizes'][0] / 1e6:.1f} MB): max abs difference "
                      f"{q['max_abs_diff']:.1e}, least cosine similarity {q['min_cosine']:.4f} "
                      "to PyTorch")
            for (batch, tokens), times in result["rows"].items():
                base = times["torch eager"]
                print(f"  batch {batch}" + (f", {tokens} tokens" if tokens else ""))
                for label, ms in times.items():
                    print(f"    {label:<24} {ms:9.2f} ms   {base / ms:5.2f}x eager")
                if "sentence-transformers" in times:
                    print(f"    ONNX Runtime vs sentence-transformers: "
                          f"{times['sentence-transformers'] / times['ONNX Runtime']:.2f}x")
            if name == "efficientnet-lite0":
                ort_batch1 = result["rows"][1, None]["ONNX Runtime"]
        if args.browser or args.browser_only:
            python = f" (ORT in Python, {threads} thread(s): {ort_batch1:.1f} ms)" \
                if ort_batch1 else ""
            print(f"\nefficientnet-lite0:classify in the page (Chromium, ONNX Runtime Web "
                  f"wasm){python}")
            for isolated in (False, True):
                page = bench_browser(Path(tmp), repeats, isolated=isolated)
                how = "cross-origin isolated" if isolated else "plain static server"
                print(f"  {how:<22} {page['threads']} thread(s): {page['inference']:.1f} ms "
                      f"per image in the model, {page['preprocess']:.1f} ms to decode and "
                      "resize")


if __name__ == "__main__":
    main()
