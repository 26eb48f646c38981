"""RNG state: capture and restore the global generators, and derive seeds from tuples.

A resumed run sees the same dropout masks and augmentations as one that never stopped only if
every random stream it draws from continues where it was: Python's ``random``, NumPy's legacy
global generator, torch's CPU generator, and this worker's CUDA generator. A checkpoint keeps
all four (each worker's own, in distributed training).
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng", "seed_everything", "seed_for"]


def seed_for(*parts: int) -> int:
    """A well-mixed 64-bit seed for a tuple of ints: ``(seed, epoch)`` -> generator seed.

    NumPy's ``SeedSequence`` hashes the tuple, so neighbouring tuples give unrelated seeds.
    """
    high, low = np.random.SeedSequence(list(parts)).generate_state(2, np.uint32)
    return (int(high) << 32) | int(low)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch's (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng(device: torch.device | str | None = None) -> dict[str, Any]:
    """The global RNG states: Python's ``random``, NumPy's legacy global RNG, torch's CPU
    generator, and the CUDA generator of ``device`` when it is a CUDA device.

    Only the one CUDA device is read, so a worker never touches (and creates contexts on)
    the GPUs of other workers.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device | str | None = None) -> None:
    """Set the global RNGs to a state from :func:`capture_rng`."""
    random.setstate(_as_tuple(state["python"]))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"],
                         numpy["cached"]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    device = torch.device(device) if device is not None else None
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8), device)


def _as_tuple(value: Any) -> Any:
    # JSON turns the tuples of random.getstate() into lists; setstate wants tuples back.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
