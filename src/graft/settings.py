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
    "credentials_path",
    "debug",
    "default_registry",
    "evaluator_watch",
    "graft_home",
    "insecure_registries",
    "offline",
    "registry_token",
    "test_stop_points",
]


def graft_home() -> Path:
    """The local store's root: ``$GRAFT_HOME``, default ``~/.cache/graft``."""
    env = os.environ.get("GRAFT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "graft"


def debug() -> bool:
    """True when ``$GRAFT_DEBUG`` asks the CLI to print tracebacks of unexpected errors."""
    return os.environ.get("GRAFT_DEBUG", "").lower() in {"1", "true", "yes", "on"}


def offline() -> bool:
    """True when ``$GRAFT_OFFLINE`` forbids any network access."""
    return os.environ.get("GRAFT_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def test_stop_points() -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    """Where a test wants this process killed and paused: ``$GRAFT_TEST_STOP_AT`` and
    ``$GRAFT_TEST_PAUSE_AT``, each ``<point>`` or ``<point>#<n>`` (see ``graft._testing``)."""
    return _stop_point("GRAFT_TEST_STOP_AT"), _stop_point("GRAFT_TEST_PAUSE_AT")


def _stop_point(variable: str) -> tuple[str, int] | None:
    text = os.environ.get(variable, "").strip()
    if not text:
        return None
    name, _, nth = text.partition("#")
    if not name or (nth and not (nth.isdigit() and int(nth) >= 1)):
        raise ValueError(f"${variable}={text!r} must be a stop point name, optionally with "
                         f"#<n> for its n-th time, e.g. {variable}=add.tree-published#2")
    return name, int(nth) if nth else 1


def evaluator_watch() -> tuple[Path, float] | None:
    """The model_dir a sidecar evaluator watches, and its poll interval in seconds:
    ``$GRAFT_EVALUATE_WATCH`` and ``$GRAFT_EVALUATE_POLL`` (default 1), which
    ``graft evaluate --watch`` sets; None in a training job."""
    text = os.environ.get("GRAFT_EVALUATE_WATCH", "").strip()
    if not text:
        return None
    return Path(text).expanduser(), _seconds("GRAFT_EVALUATE_POLL", 1.0)


def registry_token() -> str | None:
    """A bearer token for OCI registries: ``$GRAFT_TOKEN`` (never printed or logged)."""
    token = os.environ.get("GRAFT_TOKEN", "").strip()
    return token or None


def default_registry() -> str | None:
    """The registry ``graft search`` asks when none is given: ``$GRAFT_REGISTRY``
    (``host[:port]``, e.g. one run by ``graft serve``)."""
    text = os.environ.get("GRAFT_REGISTRY", "").strip()
    return text.removeprefix("oci://").rstrip("/") or None


def credentials_path() -> Path:
    """Where ``graft login`` keeps registry credentials (mode 0600):
    ``$GRAFT_CREDENTIALS``, default ``$GRAFT_HOME/credentials.json``."""
    env = os.environ.get("GRAFT_CREDENTIALS")
    return Path(env).expanduser() if env else graft_home() / "credentials.json"


def insecure_registries() -> frozenset[str]:
    """Registries spoken to over plain HTTP: ``$GRAFT_INSECURE_REGISTRIES``, comma-separated
    ``host[:port]`` (loopback hosts always are)."""
    text = os.environ.get("GRAFT_INSECURE_REGISTRIES", "")
    return frozenset(p.strip().lower() for p in text.split(",") if p.strip())


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
