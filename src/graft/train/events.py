"""TensorBoard scalars (``train/loss``, ``train/lr``, ``train/steps_per_sec``, ``eval/...``).

Only the chief writes. ``purge_step`` hides what a crashed run logged after the checkpoint a
resumed run starts from, so the curves show one run, not two overlapping ones.

Scalars are kept in memory when they are recorded (with their wall time) and handed to
TensorBoard's writer in batches: at every checkpoint and evaluation, at the end of training,
and once they are ``write_every_seconds`` old or ``max_pending`` many. Writing costs about
40 us of CPU per scalar either way (TensorBoard's writer builds the summary and checksums it
with a pure-Python CRC), but one at a time it landed on the logging step, with the writer's
thread woken for each and its 10-deep queue making the step wait. TensorBoard shows the same
curves (its writer itself only flushes to disk every 120 s). A crash loses the scalars
recorded since the last checkpoint, which is what ``purge_step`` hides from the resumed run
anyway (a checkpoint writes the batch first).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

__all__ = ["Events"]


class Events:
    """The event-file writer of one Estimator, opened on first use.

    Args:
        directory: ``model_dir``; None: nothing is written.
        enabled: Write at all (``Estimator(tensorboard=...)`` and being the chief).
        write_every_seconds: Hand recorded scalars to the writer once the oldest waiting
            one is this old (``time.monotonic``), even between checkpoints.
        max_pending: ... or once this many are waiting.
    """

    def __init__(self, directory: Path | None, enabled: bool, *,
                 write_every_seconds: float = 30.0, max_pending: int = 512) -> None:
        self.directory, self.enabled = directory, enabled and directory is not None
        self.purge_step: int | None = None
        self.write_every_seconds, self.max_pending = write_every_seconds, max_pending
        self._writer: Any = None
        self._pending: list[tuple[str, float, int, float]] = []  # tag, value, step, wall time
        self._oldest = 0.0

    def _open(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.directory.mkdir(parents=True, exist_ok=True)
            # A queue deeper than a batch: handing one over never waits for the thread.
            self._writer = SummaryWriter(log_dir=str(self.directory),
                                         purge_step=self.purge_step,
                                         max_queue=2 * self.max_pending)
        return self._writer

    def scalars(self, prefix: str, step: int, values: dict[str, Any]) -> None:
        """Record every int or float of ``values`` as ``prefix/key`` at ``step``."""
        if not self.enabled:
            return
        pending, wall = self._pending, time.time()
        if not pending:
            self._oldest = time.monotonic()
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                pending.append((f"{prefix}/{key}", float(value), step, wall))
        if len(pending) >= self.max_pending \
                or time.monotonic() - self._oldest >= self.write_every_seconds:
            self._write()

    def _write(self) -> None:
        if not self._pending:
            return
        writer = self._open()
        for tag, value, step, wall in self._pending:
            writer.add_scalar(tag, value, step, walltime=wall)
        self._pending.clear()

    def flush(self) -> None:
        """Write every recorded scalar and flush the event file."""
        self._write()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        self._write()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
