"""A stored module as a module directory, written out on first use and kept while it is used.

A store tree is not a module directory (its weights and reference files are tensor blobs,
docs/store.md). A module loaded from the store reads its programs and assets from the tree,
and needs no more; a tool that wants the module's files as a directory (``graft export onnx``
reads the reference inputs, ``graft export web`` the tokenizer) asks the loaded module for
its ``directory``, and gets this: :meth:`Store.exported` entered once, the first time, in the
store's ``tmp/``, and left (the directory removed) when the last module holding it is gone. A
process that dies leaves a staging folder that ``graft gc`` reaps.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

__all__ = ["ExportOnDemand"]


class ExportOnDemand:
    """A stored module's directory, exported on the first call of :meth:`path`.

    Args:
        store: The ``Store``.
        handle: A pinned store handle (``name@sha256:<hex>``).
    """

    def __init__(self, store: Any, handle: str) -> None:
        self._store = store
        self._handle = handle
        self._lock = threading.Lock()
        self._path: Path | None = None

    def path(self) -> Path:
        """The module directory (written out now if it was not yet)."""
        with self._lock:
            if self._path is None:
                context = self._store.exported(self._handle)
                path = context.__enter__()
                weakref.finalize(self, _leave, context)
                self._path = path
            return self._path

    def __deepcopy__(self, memo: dict[int, Any]) -> ExportOnDemand:
        return self  # a copied module shares the one directory (it is read-only for both)

    def __getstate__(self) -> dict[str, Any]:
        # another process (a pickled module) writes its own directory out when it needs one
        return {"store": self._store, "handle": self._handle}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["store"], state["handle"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"ExportOnDemand({self._handle!r}, path={self._path})"


def _leave(context: AbstractContextManager[Path]) -> None:
    try:
        context.__exit__(None, None, None)
    except Exception:  # a finalizer must not raise; gc reaps what is left
        pass
