"""Settings read from the environment, all in one place."""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = [
    "CHIEF_TIMEOUT",
    "COLLECTIVE_TIMEOUT",
    "chief_timeout",
    "collective_timeout",
    "graft_home",
    "offline",
]


def graft_home() -> Path:
    """The local store's root: ``$GRAFT_HOME``, default ``~/.cache/graft``."""
    env = os.environ.get("GRAFT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "graft"


def offline() -> bool:
    """True when ``$GRAFT_OFFLINE`` forbids any network access."""
    return os.environ.get("GRAFT_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


COLLECTIVE_TIMEOUT = 60.0
"""Default seconds a collective waits for a worker that stops answering."""

CHIEF_TIMEOUT = 600.0
"""Default seconds the other workers wait while the chief writes a checkpoint or exports."""


def collective_timeout() -> float:
    """Seconds before a stalled collective fails: ``$GRAFT_COLLECTIVE_TIMEOUT``, default 60."""
    return _seconds("GRAFT_COLLECTIVE_TIMEOUT", COLLECTIVE_TIMEOUT)


def chief_timeout() -> float:
    """Seconds the other workers wait for the chief's checkpoint writes and exports:
    ``$GRAFT_CHIEF_TIMEOUT``, default 600."""
    return _seconds("GRAFT_CHIEF_TIMEOUT", CHIEF_TIMEOUT)


def _seconds(variable: str, default: float) -> float:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"${variable}={text!r} must be a positive number of seconds, e.g. "
                         f"{variable}={default:g}")
    return value
