"""``graft export web``: a static site that runs a module's signature in the browser.

The site is the page in ``web/`` (bundled once by esbuild into ``web/dist``, with ONNX Runtime
Web's WebAssembly files copied from ``node_modules``), the module's signatures as ONNX models
(``graft export onnx``, each checked against PyTorch), and ``site.json``, which tells the page
what the module is. Nothing is fetched from anywhere but the site itself: serve the folder with
any static server (``python -m http.server -d site``) and open it.

Two signatures go in: the one "Try it" runs (the module's default, or ``--signature``) and the
feature signature a head trains on in the page (``features`` for images, ``embed`` for text,
or ``--features``; skipped when the module has none with a fixed feature width).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft import _fs
from graft.errors import ExportError, SignatureError

__all__ = ["SITE_FORMAT", "SitePlan", "WebExport", "build_bundle", "built_bundle", "cli",
           "export_web", "plan_site", "web_root", "write_site_models"]

SITE_FORMAT = "graft.site/1"
# What the page implements; anything else is refused when the site is built.
_INTERPOLATIONS = ("bilinear", "bicubic")
_TOKENIZER = {"normalizer": "BertNormalizer", "pre_tokenizer": "BertPreTokenizer",
              "model": "WordPiece", "post_processor": "TemplateProcessing"}
_SOURCES = ("src", "static", "build.mjs", "package.json", "package-lock.json")


@dataclass(frozen=True)
class WebExport:
    """What ``export_web`` wrote."""

    path: Path
    run: str
    features: str | None
    max_abs_diff: float


def web_root() -> Path:
    """The page's sources: ``web/`` of the Graft checkout this package runs from."""
    root = Path(__file__).resolve().parents[3] / "web"
    if not (root / "package.json").is_file():
        raise ExportError(f"the page's sources are not at {root}; `graft export web` runs from "
                          "a Graft checkout (pip install -e .), where web/ holds them")
    return root


def _newest(paths: list[Path]) -> float:
    times = []
    for path in paths:
        if path.is_dir():
            times += [p.stat().st_mtime for p in path.rglob("*") if p.is_file()]
        elif path.exists():
            times.append(path.stat().st_mtime)
    return max(times, default=0.0)


def _npm(root: Path, *args: str) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise ExportError("building the page needs Node.js and npm (20 or newer); install "
                          "them (e.g. apt-get install nodejs npm) and run again")
    try:
        subprocess.run([npm, *args], cwd=root, check=True, capture_output=True, text=True,
                       timeout=900)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:]
        raise ExportError(f"`npm {' '.join(args)}` in {root} failed: "
                          f"{tail[0] if tail else exc}") from None
    except subprocess.TimeoutExpired:
        raise ExportError(f"`npm {' '.join(args)}` in {root} took over 15 minutes") from None


def build_bundle(*, force: bool = False) -> Path:
    """Install the page's npm packages (``npm ci``) and bundle it, when out of date.

    Returns:
        ``web/dist``: ``index.html``, ``app.js``, ``style.css`` and ``ort/*.wasm``.
    """
    root = web_root()
    modules = root / "node_modules"
    if force or not (modules / "onnxruntime-web").is_dir() or (
            _newest([root / "package-lock.json"]) > _newest([modules / ".package-lock.json"])):
        _npm(root, "ci", "--no-audit", "--no-fund")
    dist = root / "dist"
    built = dist / "app.js"
    stale = not built.is_file() or _newest([root / s for s in _SOURCES]) > built.stat().st_mtime
    if force or stale:
        _npm(root, "run", "--silent", "build")
    return dist


def built_bundle() -> Path:
    """``web/dist`` as already built (``make install``), without running npm.

    For callers that must not build (``graft serve`` answering a request).

    Raises:
        ExportError: the bundle has not been built.
    """
    dist = web_root() / "dist"
    for name in ("index.html", "app.js", "style.css"):
        if not (dist / name).is_file():
            raise ExportError(f"the page's bundle is not built ({dist / name} is missing); run "
                              "`make install` (or `graft export web` once) in the Graft "
                              "checkout")
    return dist


def _check_page_can_run(module: Any, name: str) -> str:
    """The preprocessing kind of a signature, refusing what the page does not implement."""
    spec = module.manifest.signatures[name]
    pre = spec.preprocess
    if pre is None:
        raise ExportError(f"signature {name!r} of {module.name} takes tensors and declares no "
                          "preprocessing, so a page cannot feed it images or text")
    if pre.kind == "image":
        if pre.interpolation not in _INTERPOLATIONS:
            raise ExportError(f"signature {name!r} resizes with {pre.interpolation!r}; the page "
                              f"implements {' and '.join(_INTERPOLATIONS)}")
        return "image"
    from graft.format.jsonio import loads

    path = module.file_path(pre.tokenizer)
    tokenizer = loads(path.read_bytes(), what=pre.tokenizer, max_bytes=64 << 20)
    if not isinstance(tokenizer, dict):
        raise ExportError(f"{pre.tokenizer} of {module.name} is not a tokenizer.json object")
    for part, kind in _TOKENIZER.items():
        found = (tokenizer.get(part) or {}).get("type")
        if found != kind:
            raise ExportError(f"the tokenizer of signature {name!r} has {part} {found!r}; the "
                              f"page implements BERT WordPiece tokenizers ({part} {kind!r})")
    return "text"


def _feature_signature(module: Any, run: str, kind: str, wanted: str | None) -> str | None:
    if wanted is not None:
        if wanted not in module.manifest.signatures:
            raise SignatureError(f"--features {wanted!r}: module {module.name} has no such "
                                 f"signature; it has {sorted(module.manifest.signatures)}")
        candidates = [wanted]
    else:
        signatures = module.manifest.signatures
        candidates = [n for n in ("features", "embed") if n in signatures] or [run]
    for name in candidates:
        spec = module.manifest.signatures[name]
        outputs = list(spec.outputs.values())
        pre = spec.preprocess
        fits = (len(outputs) == 1 and outputs[0].dtype == "float32"
                and len(outputs[0].shape) == 2 and isinstance(outputs[0].shape[1], int)
                and pre is not None and pre.kind == kind)
        if fits:
            return name
        if wanted is not None:
            raise ExportError(f"--features {wanted!r} outputs "
                              f"{', '.join(map(str, outputs))}; a head trains on one "
                              f"float32[batch,D] output of a signature that takes {kind}s")
    return None


@dataclass(frozen=True)
class SitePlan:
    """What a site will run, decided (and checked against the page) before anything is built.

    Args:
        run: The signature "Try it" runs.
        kind: ``"image"`` or ``"text"``: what the page feeds it.
        features: The signature a head trains on, or None when the module has none.
    """

    run: str
    kind: str
    features: str | None


def plan_site(module: Any, *, signature: str | None = None,
              features: str | None = None) -> SitePlan:
    """Check that the page can run a module's signature; pick the feature signature.

    Raises:
        SignatureError: no such signature.
        ExportError: the page does not implement the signature's preprocessing.
    """
    run = signature or module.default_signature
    if run not in module.manifest.signatures:
        raise SignatureError(f"module {module.name} has no signature {run!r}; it has "
                             f"{sorted(module.manifest.signatures)}")
    kind = _check_page_can_run(module, run)
    feats = _feature_signature(module, run, kind, features)
    if feats is not None:
        _check_page_can_run(module, feats)
    return SitePlan(run, kind, feats)


def write_site_models(module: Any, plan: SitePlan, folder: Path) -> float:
    """Export the plan's signatures to ``folder/models`` and write ``folder/site.json``.

    This is what a site holds beside the page's bundle (``web/dist``); ``graft export web``
    copies the bundle next to it, ``graft serve`` serves the bundle from ``web/dist`` itself.
    ``site.json`` is written last, so a folder that has it is complete.

    Returns:
        The largest difference from PyTorch that ONNX Runtime showed on the reference inputs.
    """
    from graft.export.onnx import export_onnx

    entries: dict[str, dict[str, Any]] = {}
    worst = 0.0
    for name in dict.fromkeys(n for n in (plan.run, plan.features) if n is not None):
        result = export_onnx(module, folder / "models" / f"{name}.onnx", signature=name)
        worst = max(worst, result.max_abs_diff)
        entry = {"model": f"models/{name}.onnx", "config": result.config}
        if plan.kind == "text":
            entry["tokenizer"] = f"models/{result.config['preprocess']['tokenizer']}"
        entries[name] = entry
    site = {
        "format": SITE_FORMAT,
        "module": {"name": module.name, "version": module.version,
                   "digest": module.digest, "description": module.manifest.description},
        "kind": plan.kind,
        "run": entries[plan.run],
        "features": entries[plan.features] if plan.features is not None else None,
    }
    _fs.atomic_write(folder / "site.json", json.dumps(site, indent=1) + "\n")
    return worst


def export_web(handle: str | os.PathLike[str] | Any, output: str | os.PathLike[str], *,
               signature: str | None = None, features: str | None = None,
               overwrite: bool = False) -> WebExport:
    """Write the static site for a module.

    Args:
        handle: A handle or a loaded ``graft.Module``.
        output: The site's folder (created; must not exist unless ``overwrite``).
        signature: What "Try it" runs (default: the module's default signature).
        features: The signature a head trains on (default: ``features`` or ``embed``).
        overwrite: Replace an existing folder at ``output``.

    Raises:
        ExportError: the page cannot run the signature, the ONNX export fails its parity
            check, or the page cannot be built (no npm); nothing is left at ``output``.
    """
    import graft
    from graft.runtime.module import Module

    module = handle if isinstance(handle, Module) else graft.load(handle, trainable=False)
    plan = plan_site(module, signature=signature, features=features)
    target = Path(output).expanduser()
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists; remove it, choose another -o, or pass "
                          "--force to replace it")
    dist = build_bundle()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(dist, staging)
        worst = write_site_models(module, plan, staging)
        _fs.fsync_tree(staging)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(staging, target)
        _fs.fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return WebExport(target, plan.run, plan.features, worst)


def cli(args: Any) -> None:
    """``graft export web HANDLE -o DIR [--signature S] [--features S] [--force]``."""
    result = export_web(args.handle, args.output, signature=args.signature,
                        features=args.features, overwrite=args.force)
    trains = f", trains a head on {result.features!r}" if result.features else ""
    print(f"wrote {result.path}: runs {result.run!r}{trains}; ONNX Runtime matches PyTorch to "
          f"{result.max_abs_diff:.2e}")
    print(f"serve it with: python -m http.server -d {result.path} 8000  (then open "
          "http://127.0.0.1:8000)")
