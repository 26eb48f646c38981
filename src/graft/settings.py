"""Settings read from the environment, all in one place."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["graft_home", "offline"]


def graft_home() -> Path:
    """The local store's root: ``$GRAFT_HOME``, default ``~/.cache/graft``."""
    env = os.environ.get("GRAFT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "graft"


def offline() -> bool:
    """True when ``$GRAFT_OFFLINE`` forbids any network access."""
    return os.environ.get("GRAFT_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
