"""Every exception Graft raises.

Each one also inherits the builtin a caller would naturally catch, so
``except FileNotFoundError`` still works around ``graft.load``.
"""

from __future__ import annotations

__all__ = [
    "DataError",
    "ExtraNotInstalled",
    "FormatError",
    "GraftError",
    "HandleError",
    "IntegrityError",
    "ModuleNotFound",
    "PathExists",
    "SignatureError",
    "StoreError",
    "TrainingError",
    "UnsafeContentError",
    "VersionConflict",
]


class GraftError(Exception):
    """Base class of every error Graft raises."""


class ModuleNotFound(GraftError, FileNotFoundError):
    """A handle names no module in the store or on disk."""


class HandleError(GraftError, ValueError):
    """A handle string is malformed."""


class FormatError(GraftError, ValueError):
    """A module's files do not follow the graft.module/1 format."""


class UnsafeContentError(FormatError):
    """A module holds content that would run code or escape its folder if loaded."""


class IntegrityError(GraftError, ValueError):
    """A file or tensor does not match the digest its manifest records."""


class PathExists(GraftError, FileExistsError):
    """A module would be written over an existing path; modules are immutable."""


class SignatureError(GraftError, TypeError):
    """A call's inputs do not match the signature's declared specs."""


class VersionConflict(GraftError, FileExistsError):
    """A different module is already stored under the same name and version."""


class StoreError(GraftError, OSError):
    """The local store cannot be read or written."""


class ExtraNotInstalled(GraftError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class DataError(GraftError, ValueError):
    """Training or evaluation data is empty, malformed or inconsistent."""


class TrainingError(GraftError, RuntimeError):
    """Training cannot go on (for example, the loss became NaN)."""
