"""Named stop points, so tests can stop a writer at an exact step instead of after a sleep.

A writer calls ``stop_point("add.tree-published")`` at each step worth testing. Normally this
does nothing: the environment is read once, at import, and an unset hook is one comparison.
With ``GRAFT_TEST_STOP_AT=<point>`` the process SIGKILLs itself on reaching the point (a
crash there); with ``GRAFT_TEST_PAUSE_AT=<point>`` it SIGSTOPs itself, so that a parent
waiting with ``os.waitpid(pid, os.WUNTRACED)`` can act while it is frozen and then send
``SIGCONT``. ``<point>#<n>`` stops at the n-th time the point is reached (default the first).
"""

from __future__ import annotations

import os
import signal

from graft.settings import test_stop_points

__all__ = ["stop_point"]

_KILL_AT, _PAUSE_AT = test_stop_points()
_seen: dict[str, int] = {}


def stop_point(name: str) -> None:
    """Kill or pause this process here if a test asked for it (see the module docstring)."""
    if _KILL_AT is None and _PAUSE_AT is None:
        return
    count = _seen[name] = _seen.get(name, 0) + 1
    if _KILL_AT == (name, count):
        os.kill(os.getpid(), signal.SIGKILL)
    if _PAUSE_AT == (name, count):
        os.kill(os.getpid(), signal.SIGSTOP)  # resumes when the test sends SIGCONT
