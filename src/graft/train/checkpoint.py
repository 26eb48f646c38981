"""Training checkpoints: written atomically, read back without unpickling anything.

A checkpoint is a directory holding everything needed to continue training exactly where it
stopped, as safetensors tensors plus a JSON document:

```
<model_dir>/checkpoints/
  step-000000020/
    model.safetensors     the model's state_dict (parameters and buffers)
    state.safetensors     every other tensor: optimizer and scheduler state, RNG states
    state.json            format tag, step, data position, the optimizer's and scheduler's
                          state_dict structure (tensors replaced by references into
                          state.safetensors), python/numpy RNG state, sha256 of both files
  step-000000030/
  latest                  the name of the newest complete checkpoint, one line
```

Writing goes to a hidden temporary directory that is fsynced and then renamed into place, and
``latest`` is replaced atomically after it: a crash at any moment leaves the previous
checkpoint intact and findable. Only the last ``keep`` checkpoints are kept.

Reading verifies both files against the digests in ``state.json`` and uses only
``safetensors`` and ``json``: no ``pickle``, no ``torch.load``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from graft._fs import atomic_write, fsync_dir, fsync_tree, sha256_file
from graft.errors import FormatError, IntegrityError

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "FORMAT",
    "read_checkpoint",
    "recover_directory",
    "replace_directory",
    "staging_directory",
    "write_checkpoint",
]

FORMAT = "graft.checkpoint/1"
_MODEL_FILE = "model.safetensors"
_STATE_FILE = "state.safetensors"
_JSON_FILE = "state.json"
_LATEST = "latest"
_NAME = re.compile(r"^step-(\d{9,})$")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back from disk.

    Attributes:
        path: Its directory.
        step: The number of optimizer steps the saved weights have taken.
        model: The model's state_dict (CPU tensors).
        optimizer: The optimizer's state_dict, or None if none was saved.
        scheduler: The learning-rate scheduler's state_dict, or None.
        rng: The RNG states for :func:`graft.train.rng.restore_rng`, or None.
        data: Where training stood in its data (epoch, batch, sizes, seed).
        extra: Any other JSON values saved with it.
    """

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


# -- state_dict <-> JSON + tensors -----------------------------------------------------------
#
# JSON objects only ever appear as markers ({"$tensor": key}, {"$dict": [[k, v], ...]}, ...),
# so a user's dict can hold any keys (ints, as optimizers use) and still come back exactly.


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = path or "value"
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": key}
    if isinstance(value, np.ndarray):
        return _encode(torch.from_numpy(value), path, tensors)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
        # Plain ints encode as themselves: the Python RNG state's 625 words in one pass.
        return list(value) if isinstance(value, list) else {"$tuple": list(value)}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, Mapping):
        items = []
        for k, v in value.items():
            if not isinstance(k, (str, int, bool)) and k is not None:
                raise FormatError(f"cannot checkpoint {path or 'state'}: key {k!r} is a "
                                  f"{type(k).__name__}; keys must be str or int")
            items.append([k, _encode(v, f"{path}.{k}" if path else str(k), tensors)])
        return {"$dict": items}
    raise FormatError(f"cannot checkpoint {path or 'state'}: a {type(value).__name__} is "
                      "neither a tensor nor a JSON value (str, number, bool, None, list, "
                      "tuple, dict); keep only those in state_dicts")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise FormatError(f"checkpoint state holds an unknown JSON object {value!r:.200}")
    (tag, body), = value.items()
    if tag == "$tensor":
        if body not in tensors:
            raise FormatError(f"checkpoint state refers to tensor {body!r}, which "
                              f"{_STATE_FILE} does not hold")
        return tensors[body]
    if tag == "$dict":
        return {k: _decode(v, tensors) for k, v in body}
    if tag == "$tuple":
        return tuple(_decode(v, tensors) for v in body)
    if tag == "$float":
        return float(body)
    if tag == "$bytes":
        return base64.b64decode(body)
    raise FormatError(f"checkpoint state holds an unknown marker {tag!r}")


# -- one checkpoint directory ----------------------------------------------------------------


def write_checkpoint(directory: str | os.PathLike[str], *, step: int,
                     model: Mapping[str, torch.Tensor],
                     optimizer: Mapping[str, Any] | None = None,
                     scheduler: Mapping[str, Any] | None = None,
                     rng: Mapping[str, Any] | None = None,
                     data: Mapping[str, Any] | None = None,
                     extra: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint's files into ``directory`` (created; must not exist) and fsync them.

    This alone is not atomic: :meth:`CheckpointManager.save` writes to a temporary directory
    with it and renames that into place.

    Args:
        directory: Where to write.
        step: The optimizer step the state belongs to.
        model: A model ``state_dict``.
        optimizer: An optimizer ``state_dict``.
        scheduler: A learning-rate scheduler ``state_dict``.
        rng: RNG states from :func:`graft.train.rng.capture_rng`.
        data: The data position (JSON values).
        extra: Other JSON values to keep with the checkpoint.

    Raises:
        FormatError: a state holds a value that is neither a tensor nor JSON.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    model_tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.items()}
    tensors: dict[str, torch.Tensor] = {}
    doc = {
        "format": FORMAT,
        "step": int(step),
        "data": _encode(dict(data or {}), "data", tensors),
        "optimizer": None if optimizer is None else _encode(optimizer, "optimizer", tensors),
        "scheduler": None if scheduler is None else _encode(scheduler, "scheduler", tensors),
        "rng": None if rng is None else _encode(rng, "rng", tensors),
        "extra": _encode(dict(extra or {}), "extra", tensors),
    }
    directory.mkdir(parents=True)
    save_file(model_tensors, str(directory / _MODEL_FILE))
    save_file(tensors, str(directory / _STATE_FILE))
    doc["files"] = {name: sha256_file(directory / name) for name in (_MODEL_FILE, _STATE_FILE)}
    # Compact: indent= would take json's pure-Python encoder (2 ms a checkpoint, on the step).
    (directory / _JSON_FILE).write_text(json.dumps(doc, sort_keys=True) + "\n",
                                        encoding="utf-8")
    fsync_tree(directory)
    return directory


def read_checkpoint(directory: str | os.PathLike[str]) -> Checkpoint:
    """Read and verify a checkpoint directory.

    Raises:
        FileNotFoundError: ``directory`` is not a checkpoint.
        IntegrityError: a file does not match the digest ``state.json`` records.
        FormatError: ``state.json`` is not a ``graft.checkpoint/1`` document.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    doc_path = directory / _JSON_FILE
    if not doc_path.is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint: it has no {_JSON_FILE}")
    try:
        doc = json.loads(doc_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{doc_path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FormatError(f"{doc_path} is not a {FORMAT} document (format="
                          f"{doc.get('format') if isinstance(doc, dict) else None!r})")
    for name in (_MODEL_FILE, _STATE_FILE):
        expected = doc.get("files", {}).get(name)
        if not (directory / name).is_file():
            raise IntegrityError(f"checkpoint {directory} is missing {name}")
        if sha256_file(directory / name) != expected:
            raise IntegrityError(f"checkpoint {directory}: {name} does not match the sha256 "
                                 f"recorded in {_JSON_FILE}; the file is damaged. Resume from "
                                 "an earlier checkpoint (remove this directory)")
    model = load_file(str(directory / _MODEL_FILE))
    tensors = load_file(str(directory / _STATE_FILE))
    return Checkpoint(
        path=directory,
        step=int(doc["step"]),
        model=model,
        optimizer=_decode(doc.get("optimizer"), tensors),
        scheduler=_decode(doc.get("scheduler"), tensors),
        rng=_decode(doc.get("rng"), tensors),
        data=_decode(doc.get("data") or {"$dict": []}, tensors),
        extra=_decode(doc.get("extra") or {"$dict": []}, tensors),
    )


def replace_directory(staged: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Move the complete directory ``staged`` to ``target``, replacing what is there.

    A directory cannot be renamed over a non-empty one, so the old ``target`` is first
    renamed aside. A crash between the two renames leaves ``target`` missing and the old one
    under ``.<name>.old-*``; :func:`recover_directory` puts it back.
    """
    staged, target = Path(staged), Path(target)
    fsync_tree(staged)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    os.rename(staged, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_directory(target: Path) -> None:
    """Undo a :func:`replace_directory` interrupted between its two renames."""
    if target.exists():
        for old in target.parent.glob(f".{target.name}.old-*"):
            shutil.rmtree(old, ignore_errors=True)
        return
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.rename(olds[-1], target)


@contextlib.contextmanager
def staging_directory(parent: Path, name: str) -> Iterator[Path]:
    """A fresh hidden directory in ``parent`` (same filesystem), removed unless moved away."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- a directory of checkpoints --------------------------------------------------------------


class CheckpointManager:
    """The checkpoints of one training run, in ``directory``: save, find, prune.

    Args:
        directory: Where checkpoints live (the Estimator uses ``<model_dir>/checkpoints``).
        keep: How many of the newest checkpoints to keep; older ones are removed after each
            save.
        protect: ``protect(path) -> True`` keeps an old checkpoint past ``keep`` (a sidecar
            evaluator has not evaluated it yet); None: nothing is protected.
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 3,
                 protect: Callable[[Path], bool] | None = None) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1 (the number of checkpoints to keep); "
                             f"got {keep!r}")
        self.directory = Path(directory)
        self.keep = keep
        self.protect = protect

    @staticmethod
    def name(step: int) -> str:
        """The directory name of the checkpoint of ``step``."""
        return f"step-{step:09d}"

    def checkpoints(self) -> list[Path]:
        """Every complete checkpoint, oldest step first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match and (path / _JSON_FILE).is_file():
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when there is none.

        Follows the ``latest`` pointer; if it is missing or dangling, falls back to the
        highest-step complete checkpoint (renames are atomic, so every ``step-*`` directory
        is complete).
        """
        pointer = self.directory / _LATEST
        if pointer.is_file():
            name = pointer.read_text(encoding="utf-8").strip()
            if _NAME.match(name) and (self.directory / name / _JSON_FILE).is_file():
                return self.directory / name
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, **state: Any) -> Path:
        """Atomically write the checkpoint of ``step``, point ``latest`` at it, prune old ones.

        Args:
            step: The optimizer step.
            **state: ``model=``, ``optimizer=``, ... as for :func:`write_checkpoint`.

        Returns:
            The checkpoint's directory.
        """
        name = self.name(step)
        target = self.directory / name
        with staging_directory(self.directory, name) as tmp:
            write_checkpoint(tmp, step=step, **state)
            replace_directory(tmp, target)
        atomic_write(self.directory / _LATEST, name + "\n")
        self._prune(keep_path=target)
        return target

    def read(self, path: str | os.PathLike[str] | None = None) -> Checkpoint:
        """Read ``path``, or the latest checkpoint when ``path`` is None.

        Raises:
            FileNotFoundError: there is no checkpoint.
        """
        if path is None:
            path = self.latest()
            if path is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return read_checkpoint(path)

    def _prune(self, keep_path: Path) -> None:
        found = self.checkpoints()
        for path in found[: max(0, len(found) - self.keep)]:
            if path != keep_path and not (self.protect is not None and self.protect(path)):
                shutil.rmtree(path, ignore_errors=True)
        # Leftovers of writers that crashed mid-save (never this process's own).
        for pattern in (".tmp-*", ".step-*.old-*"):
            for path in self.directory.glob(pattern):
                if f"-{os.getpid()}-" not in path.name:
                    shutil.rmtree(path, ignore_errors=True)
