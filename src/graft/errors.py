"""Every exception Graft raises.

Each one also inherits the builtin a caller would naturally catch, so
``except FileNotFoundError`` still works around ``graft.load``.
"""

from __future__ import annotations

__all__ = [
    "DataError",
    "ExportError",
    "ExtraNotInstalled",
    "FormatError",
    "GraftError",
    "HandleError",
    "IntegrityError",
    "ModuleNotFound",
    "NotTrainable",
    "PathExists",
    "ProgramError",
    "RegistryAuthError",
    "RegistryError",
    "RequestRefused",
    "SaveWarning",
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


class NotTrainable(GraftError, ValueError):
    """A module saved without train programs (eval-only) is asked to fine-tune."""


class SaveWarning(UserWarning):
    """``graft.save`` made a module, but narrower than the model: eval-only, or bounded dims."""


class VersionConflict(GraftError, FileExistsError):
    """A different module is already stored under the same name and version."""


class StoreError(GraftError, OSError):
    """The local store cannot be read or written."""


class RegistryError(GraftError, ConnectionError):
    """An OCI registry cannot be reached, refuses a request, or answers outside the protocol."""


class RegistryAuthError(RegistryError, PermissionError):
    """An OCI registry refuses the credentials (401) or the permission (403)."""


class ExtraNotInstalled(GraftError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class DataError(GraftError, ValueError):
    """Training or evaluation data is empty, malformed or inconsistent."""


class ExportError(GraftError, RuntimeError):
    """A signature cannot be exported to ONNX or the browser, or the export disagrees with it."""


class TrainingError(GraftError, RuntimeError):
    """Training cannot go on (for example, the loss became NaN)."""


class ProgramError(GraftError, RuntimeError):
    """A program cannot run: an operator failed, or asked for more work than the limits allow."""


# -- graft serve ---------------------------------------------------------------------------


class RequestRefused(GraftError, ValueError):
    """A request to `graft serve` is refused; carries the HTTP status and the OCI error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
