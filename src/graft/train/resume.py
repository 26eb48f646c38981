"""Resumption and warm starts: what a checkpoint holds of a run, and putting it back.

Resuming (``model_dir`` already holds checkpoints) restores everything: weights, optimizer
and scheduler state, the data position and every worker's RNG streams, so the resumed run
ends with the weights of a run that never stopped. A warm start (``warm_start_from``, as in
TensorFlow's ``WarmStartSettings``) takes only weights, from another run's checkpoint, and
only on a fresh start: the step, optimizer and data position begin anew.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graft.errors import TrainingError
from graft.train.checkpoint import Checkpoint, CheckpointManager, read_checkpoint
from graft.train.rng import capture_rng
from graft.train.sampling import Position

__all__ = ["WarmStart", "checkpoint_state", "position_of", "warm_start", "worker_rng"]


class WarmStart:
    """Where a warm start takes its weights from, and which.

    Args:
        source: A checkpoint directory, a ``model_dir`` (its latest checkpoint), or a
            safetensors file of a ``state_dict``.
        include: A regular expression; only parameters and buffers whose names match it (with
            ``re.search``) are taken. None: every one whose name and shape match.

    Raises:
        ValueError: ``include`` is not a valid regular expression.
    """

    def __init__(self, source: str | os.PathLike[str], *, include: str | None = None) -> None:
        self.source = Path(source).expanduser()
        try:
            self.include = re.compile(include) if include is not None else None
        except re.error as exc:
            raise ValueError(f"WarmStart: include={include!r} is not a regular expression "
                             f"({exc})") from None

    def __repr__(self) -> str:
        pattern = self.include.pattern if self.include is not None else None
        return f"WarmStart({str(self.source)!r}, include={pattern!r})"


def _source_tensors(source: Path) -> dict[str, torch.Tensor]:
    if source.is_file():
        from safetensors.torch import load_file

        return load_file(str(source))
    if (source / "state.json").is_file():
        return read_checkpoint(source).model
    latest = CheckpointManager(source / "checkpoints").latest()
    if latest is None:
        raise FileNotFoundError(f"warm_start_from={str(source)!r} is neither a checkpoint, a "
                                "model_dir with checkpoints, nor a safetensors file")
    return read_checkpoint(latest).model


def warm_start(model: nn.Module, spec: WarmStart) -> list[str]:
    """Copy the matching tensors of ``spec.source`` into ``model``; the names taken.

    Raises:
        FileNotFoundError: the source does not exist.
        TrainingError: no tensor matched, or a matching name has another shape.
    """
    tensors = _source_tensors(spec.source)
    own = model.state_dict()
    taken: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if name not in own or (spec.include is not None and not spec.include.search(name)):
            continue
        if own[name].shape != value.shape:
            raise TrainingError(f"warm start: {name!r} is {tuple(value.shape)} in "
                                f"{spec.source} but {tuple(own[name].shape)} in the model; "
                                "narrow WarmStart(include=...) to the layers that match")
        taken[name] = value
    if not taken:
        raise TrainingError(f"warm start from {spec.source}: none of its "
                            f"{len(tensors)} tensors matches a parameter or buffer of the "
                            f"model (first of the model: {list(own)[:3]}); check the source "
                            "or WarmStart(include=...)")
    with torch.no_grad():
        for name, value in taken.items():
            own[name].copy_(value)
    return sorted(taken)


def position_of(ckpt: Checkpoint) -> Position:
    """The data position a checkpoint recorded."""
    data = ckpt.data
    return Position(step=ckpt.step, epoch=int(data.get("epoch") or 0),
                    batch=int(data.get("batch") or 0), offset=int(data.get("offset") or 0),
                    **{k: data.get(k) for k in ("examples", "batch_size", "seed",
                                                "world_size")})


def worker_rng(ckpt: Checkpoint, rank: int) -> Any:
    """This worker's own RNG streams out of a checkpoint (the chief's when it holds one)."""
    rng = ckpt.rng
    workers = rng.get("workers") if isinstance(rng, dict) else None
    if workers and rank < len(workers):
        return workers[rank]
    return rng


def checkpoint_state(position: Position, strategy: Any) -> tuple[dict[str, Any], Any]:
    """``(data position, RNG states)`` to save; every worker must call it (it gathers)."""
    rng = capture_rng(strategy.device)
    if strategy.world_size > 1:  # every worker's, so each resumes its own stream
        rng = {**rng, "workers": strategy.gather_states(rng)}
    data = {k: v for k, v in asdict(position).items() if k != "step"}
    return data, rng
