"""TensorBoard scalars (``train/loss``, ``train/lr``, ``train/steps_per_sec``, ``eval/...``).

Only the chief writes. ``purge_step`` hides what a crashed run logged after the checkpoint a
resumed run starts from, so the curves show one run, not two overlapping ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["Events"]


class Events:
    """The event-file writer of one Estimator, opened on first use.

    Args:
        directory: ``model_dir``; None: nothing is written.
        enabled: Write at all (``Estimator(tensorboard=...)`` and being the chief).
    """

    def __init__(self, directory: Path | None, enabled: bool) -> None:
        self.directory, self.enabled = directory, enabled and directory is not None
        self.purge_step: int | None = None
        self._writer: Any = None

    def _open(self) -> Any:
        if not self.enabled:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.directory.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.directory),
                                         purge_step=self.purge_step)
        return self._writer

    def scalars(self, prefix: str, step: int, values: dict[str, Any]) -> None:
        """Record every int or float of ``values`` as ``prefix/key`` at ``step``."""
        writer = self._open()
        if writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"{prefix}/{key}", float(value), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
