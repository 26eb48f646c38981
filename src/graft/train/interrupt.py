"""Ctrl-C during training: held back while an update or a checkpoint write is under way.

Outside those critical sections Ctrl-C raises ``KeyboardInterrupt`` at once, as usual; the
model, optimizer and data position then still describe the last completed step, which is what
the interrupt checkpoint saves. Only the main thread can install signal handlers; in other
threads the guard does nothing.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["InterruptGuard"]


class InterruptGuard:
    """A context manager that defers SIGINT inside :meth:`critical` sections."""

    def __init__(self) -> None:
        self._depth = 0
        self._pending = False
        self._previous: Any = None
        self._installed = False
        self._critical = _Critical(self)  # one object, entered twice per training step

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self._depth:
            self._pending = True
            return
        self._forward(signum, frame)

    def _forward(self, signum: int, frame: Any) -> None:
        if callable(self._previous) and self._previous is not signal.default_int_handler:
            self._previous(signum, frame)
        elif self._previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    def critical(self) -> _Critical:
        """A section Ctrl-C cannot cut: a pending interrupt is raised when it ends.

        Sections nest (a depth count), so the one returned object can be entered again.
        """
        return self._critical


class _Critical:
    """``with guard.critical():`` (a plain class with slots: it runs on every step)."""

    __slots__ = ("guard",)

    def __init__(self, guard: InterruptGuard) -> None:
        self.guard = guard

    def __enter__(self) -> None:
        self.guard._depth += 1

    def __exit__(self, *exc: object) -> None:
        guard = self.guard
        guard._depth -= 1
        if guard._pending and not guard._depth:
            guard._pending = False
            guard._forward(signal.SIGINT, None)
