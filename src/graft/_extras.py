"""Imports of optional dependencies with errors that name the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from graft.errors import ExtraNotInstalled


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise an error naming the ``graft-hub`` extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExtraNotInstalled(
            f"{purpose} needs the '{module}' package, which is not installed; "
            f"install it with: pip install 'graft-hub[{extra}]'"
        ) from exc
