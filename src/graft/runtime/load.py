"""``graft.load``: resolve a handle, check the module, and build a ``graft.Module``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from graft.errors import FormatError, IntegrityError, NotTrainable
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
            directory (``./path``, ``/abs/path``, ``file://...``), or a module on an OCI
            registry (``oci://host/ns/name:1.0.0``, pulled into the store on first use).
        trainable: ``True``: parameters require grad and ``.train()`` runs the train programs.
            ``False``: frozen, always the eval programs. ``None``: the module's own policy.
        batch_norm: In train mode, ``"update"`` (batch statistics, running statistics
            updated) or ``"frozen"`` (running statistics used and kept; better for small
            fine-tuning batches). ``None``: the module's own policy.
        store: The store to resolve store handles in (default: ``$GRAFT_HOME``).

    Raises:
        ModuleNotFound: nothing answers to the handle.
        IntegrityError: a file does not match its recorded digest.
        NotTrainable: ``trainable=True`` for a module saved eval-only (the reason is given).
        FormatError / UnsafeContentError: the module is malformed or holds code or pickles.
    """
    from graft.hub.handles import parse_handle

    parsed = parse_handle(handle)
    if parsed.kind == "oci":
        from graft.hub.oci.pull import pull

        # Pulled, verified and cached on first use; from then on a store module like any.
        pulled = pull(parsed.url, store=store)
        parsed = parse_handle(f"{pulled.name}@{pulled.digest}")
    if parsed.kind == "store":
        from graft.hub.store import Store

        stored, manifest = (store or Store()).open(parsed, reading_tensors=True)
        directory = Path(stored.path)
        # The store checked every byte and refused code and pickles when the module entered
        # it; open() re-hashed the small files and checked the weights' fingerprint
        # (docs/store.md).
    elif parsed.kind == "path":
        directory = Path(parsed.path).expanduser()
        manifest = Manifest.read(directory)
        check_module(directory, manifest, hash_contents=True)
    else:
        raise FormatError(f"cannot load {handle!s}: remote registries are not configured in "
                          "this version; pull the module into the local store first")
    if trainable and manifest.fine_tuning.eval_only:
        raise NotTrainable(f"module {manifest.name}@{manifest.version} cannot be fine-tuned: "
                           f"it was saved eval-only ({manifest.fine_tuning.eval_only}); load it "
                           "with trainable=False to run it, or re-save the model with a "
                           "train mode that torch.export can trace")
    if parsed.kind == "store" and stored.deferred is not None:
        # The store keeps each tensor as its own blob, checked as it is read (docs/store.md).
        tensors = _read_stored(store or Store(), stored, manifest)
    elif parsed.kind == "store" and (blobs := (store or Store()).tensor_blobs(stored, manifest)) \
            is not None:
        tensors = _read_blobs(manifest, blobs)  # checked by open()
    else:
        tensors = read_safetensors(resolve_inside(directory.resolve(), "weights.safetensors"))
        # safetensors hands out tensors at the file's byte offsets; kernels vectorise
        # differently over misaligned memory (EfficientNet's eval logits moved by 1e-13), so
        # each tensor gets its own allocation, as the source model's had: bit-exact with
        # eager, not just close.
        tensors = {k: v.clone() for k, v in tensors.items()}
        # (tensors read from store blobs are built from the manifest's dtypes and shapes)
        _check_tensors(manifest, tensors)
    # A store tree keeps weights and reference files as blobs: `module.directory` writes
    # the module directory out when a tool first asks for it.
    on_demand = (store or Store()).files_on_demand(stored) if parsed.kind == "store" else None
    module = Module(manifest, directory, tensors,
                    trainable=manifest.fine_tuning.trainable if trainable is None else trainable,
                    batch_norm=batch_norm, on_demand=on_demand)
    if parsed.kind == "store":
        # While the module lives, `graft rm` and `gc` leave its tree (read lazily) in place.
        module._store_lease = stored.lease
    return module


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a malformed header is a ``FormatError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from graft.format.tensorfile import read_safetensors_header

    # Structure and bounds first (a regular file, offsets inside it, no absurd tensors), by
    # Graft's own reader, before safetensors maps it.
    read_safetensors_header(path, what=path.name)
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError) as exc:
        raise FormatError(f"{path.name} is not a valid safetensors file ({exc}); the module "
                          "is corrupt") from None


_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
                 "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
                 "bool": torch.bool}


#: Smallest tensor blob that ``graft.load`` maps rather than reads (see ``_read_stored``).
_MAP_MIN = 64 << 10


def _read_stored(store: Any, stored: Any, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Each tensor from its store blob, dtype and shape from the validated manifest; the
    store checks every blob on the way.

    A blob the store has to hash is read into a fresh torch allocation and hashed there (its
    bytes are read once). A blob whose recorded fingerprint vouches for it is mapped
    copy-on-write instead: no copy at load, pages shared with the page cache and with other
    processes using the same tensor, and writes (fine-tuning in place) land in private pages,
    never in the store. Blobs start at offset 0, so every mapping is page-aligned. Blobs under
    :data:`_MAP_MIN` bytes are read even when vouched for: a mapping costs a call to make it,
    one to unmap it and a page fault on first use, more than copying a page or two (most of
    a CNN's tensors are such: biases, norms, depthwise kernels).
    """
    import mmap
    import sys

    from graft.hub.tensors import read_fd

    if sys.byteorder != "little":
        raise FormatError("tensor blobs hold little-endian bytes; this machine is big-endian")
    entries = manifest.tensors
    out: dict[str, torch.Tensor] = {}

    # Each tensor is allocated in its own dtype and shape and read straight into: no views
    # to make afterwards (hundreds per load).
    def alloc(name: str, size: int) -> Any:
        entry = entries[name]
        tensor = out[name] = torch.empty(entry.shape, dtype=_TORCH_DTYPES[entry.dtype])
        return _writable(tensor)

    def mapped(name: str, fd: int, size: int) -> None:
        if size < _MAP_MIN:
            into = alloc(name, size)
            if os.preadv(fd, [into], 0) != size:  # one call, unless it comes up short
                read_fd(fd, size, into, f"the blob of tensor {name}")  # from offset 0
            return
        # The tensor keeps the mapping alive; the mapping outlives the closed descriptor.
        entry = entries[name]
        out[name] = torch.frombuffer(mmap.mmap(fd, size, access=mmap.ACCESS_COPY),
                                     dtype=_TORCH_DTYPES[entry.dtype]).view(entry.shape)

    store.read_tensors(stored, manifest, alloc, mapped)
    return out


def _writable(tensor: torch.Tensor) -> Any:
    """A writable buffer over a new contiguous tensor's bytes (numpy has no bfloat16: that
    one is seen as bytes)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(-1).view(torch.uint8).numpy()
    return tensor.numpy()


def _read_blobs(manifest: Manifest, blobs: dict[str, str]) -> dict[str, torch.Tensor]:
    """Build each tensor from its store blob: dtype and shape from the validated manifest,
    the bytes read straight into a fresh (aligned) torch allocation; nothing is parsed."""
    import sys

    from graft.hub.tensors import read_tensor

    if sys.byteorder != "little":
        raise FormatError("tensor blobs hold little-endian bytes; this machine is big-endian")
    out = {}
    for name, entry in manifest.tensors.items():
        dtype = _TORCH_DTYPES[entry.dtype]  # the manifest allows only these names
        count = dtype.itemsize
        for dim in entry.shape:
            count *= dim
        flat = torch.empty(count, dtype=torch.uint8)
        if count:
            read_tensor(blobs[name], count, flat.numpy())
        out[name] = flat.view(dtype).view(entry.shape)
    return out


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
