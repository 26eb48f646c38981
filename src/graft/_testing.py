"""Named stop points, so tests can stop a writer at an exact step instead of after a sleep.

A writer calls ``stop_point("add.tree-published")`` at each step worth testing. Normally this
does nothing: the environment is read once, at import, and an unset hook is one comparison.
With ``GRAFT_TEST_STOP_AT=<point>`` the process SIGKILLs itself on reaching the point (a
crash there); with ``GRAFT_TEST_PAUSE_AT=<point>`` it SIGSTOPs itself, so that a parent
waiting with ``os.waitpid(pid, os.WUNTRACED)`` can act while it is frozen and then send
``SIGCONT``. ``<point>#<n>`` stops at the n-th time the point is reached (default the first).
"""

from __future__ import annotations

import signal
import threading

from graft.settings import test_stop_points

__all__ = ["stop_point"]

_KILL_AT, _PAUSE_AT = test_stop_points()
_seen: dict[str, int] = {}
_counting = threading.Lock()  # pull threads reach one point together: count each once


def stop_point(name: str) -> None:
    """Kill or pause this process here if a test asked for it (see the module docstring)."""
    if _KILL_AT is None and _PAUSE_AT is None:
        return
    with _counting:
        count = _seen[name] = _seen.get(name, 0) + 1
    # Sent to this thread, not the process: a process-wide signal may be taken by another
    # thread, and this one would run on past the point until the stop reached it. A stop or a
    # kill still ends or freezes every thread, and this one before it returns from the call.
    if _KILL_AT == (name, count):
        signal.pthread_kill(threading.get_ident(), signal.SIGKILL)
    if _PAUSE_AT == (name, count):
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)  # until the test's SIGCONT
