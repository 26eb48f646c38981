"""``graft.load``: resolve a handle, check the module, and build a ``graft.Module``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from graft.errors import FormatError, IntegrityError
from graft.format.manifest import Manifest, resolve_inside
from graft.format.validate import check_module
from graft.runtime.module import Module
from graft.format.spec import dtype_name_or_str

__all__ = ["load", "read_safetensors"]


def load(handle: str | os.PathLike[str], *, trainable: bool | None = None,
         batch_norm: str | None = None, store: Any = None) -> Module:
    """Load a module by handle.

    Args:
        handle: ``name``, ``name@1.0.0``, ``name@sha256:<hex>`` (the local store), a module
            directory (``./path``, ``/abs/path``, ``file://...``).
        trainable: ``True``: parameters require grad and ``.train()`` runs the train programs.
            ``False``: frozen, always the eval programs. ``None``: the module's own policy.
        batch_norm: In train mode, ``"update"`` (batch statistics, running statistics
            updated) or ``"frozen"`` (running statistics used and kept; better for small
            fine-tuning batches). ``None``: the module's own policy.
        store: The store to resolve store handles in (default: ``$GRAFT_HOME``).

    Raises:
        ModuleNotFound: nothing answers to the handle.
        IntegrityError: a file does not match its recorded digest.
        FormatError / UnsafeContentError: the module is malformed or holds code or pickles.
    """
    from graft.hub.handles import parse_handle

    parsed = parse_handle(handle)
    if parsed.kind == "store":
        from graft.hub.store import Store

        stored, manifest = (store or Store()).open(parsed)
        directory = Path(stored.path)
        # The store checked every byte and refused code and pickles when the module entered
        # it; open() re-checked that every file is there with its size (verify-on-read).
    elif parsed.kind == "path":
        directory = Path(parsed.path).expanduser()
        manifest = Manifest.read(directory)
        check_module(directory, manifest, hash_contents=True)
    else:
        raise FormatError(f"cannot load {handle!s}: remote registries are not configured in "
                          "this version; pull the module into the local store first")
    tensors = read_safetensors(resolve_inside(directory.resolve(), "weights.safetensors"))
    _check_tensors(manifest, tensors)
    return Module(manifest, directory, tensors,
                  trainable=manifest.fine_tuning.trainable if trainable is None else trainable,
                  batch_norm=batch_norm)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a malformed header is a ``FormatError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError) as exc:
        raise FormatError(f"{path.name} is not a valid safetensors file ({exc}); the module "
                          "is corrupt") from None


def _check_tensors(manifest: Manifest, tensors: dict[str, torch.Tensor]) -> None:
    expected, found = set(manifest.tensors), set(tensors)
    if expected != found:
        missing, extra = sorted(expected - found)[:5], sorted(found - expected)[:5]
        raise IntegrityError(f"weights.safetensors does not hold the tensors the manifest "
                             f"lists (missing {missing}, unexpected {extra})")
    for key, entry in manifest.tensors.items():
        tensor = tensors[key]
        if dtype_name_or_str(tensor.dtype) != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise IntegrityError(f"tensor {key} is {tensor.dtype}{list(tensor.shape)} but the "
                                 f"manifest records {entry.dtype}{list(entry.shape)}")
