"""What one `graft serve` process is configured with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from graft.server.blobs import DEFAULT_MAX_UPLOAD

__all__ = ["ServeConfig"]


@dataclass(frozen=True)
class ServeConfig:
    """The settings of one server.

    Args:
        root: Where blobs, upload sessions and ``registry.sqlite`` live.
        max_upload: The most bytes one blob upload may have (larger ones get 413).
        upstream: ``oci://HOST[:PORT][/NAMESPACE]`` of an existing registry: the server then
            shows pages and search for what that registry holds, and holds no bytes itself.
        public_host: ``HOST[:PORT]`` that the pages' copy line names; default: the Host header
            of the request (or the upstream's host).
        refresh_seconds: In upstream mode, how often the index is refreshed from the upstream.
    """

    root: Path
    max_upload: int = DEFAULT_MAX_UPLOAD
    upstream: str | None = None
    public_host: str | None = None
    refresh_seconds: float = 30.0

    @property
    def database(self) -> Path:
        return self.root / "registry.sqlite"
