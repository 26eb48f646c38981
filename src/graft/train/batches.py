"""Batches in and out of a model: calling it on a batch, moving batches, joining outputs.

A batch's inputs are a tensor (``model(x)``), a tuple or list (``model(*xs)``) or a dict
(``model(**xs)``); outputs are tensors, or tuples / dicts of them.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from graft.errors import DataError, TrainingError

__all__ = ["as_inputs", "call", "concat", "is_tensor_batch", "move", "slice_batch",
           "tensor_batch_size", "to_cpu"]


def as_inputs(inputs: Any) -> tuple[Any, ...]:
    """The positional arguments a batch's inputs stand for."""
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def call(model: Any, inputs: Any) -> Any:
    """``model(x)``, ``model(*xs)`` or ``model(**xs)`` for a tensor, tuple or dict batch."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*as_inputs(inputs))


def move(inputs: Any, labels: Any, device: torch.device) -> tuple[Any, Any, tuple[Any, ...]]:
    """``(inputs, labels)`` on ``device``, and the input tensors in call order.

    A single input tensor stays a tensor (it runs once per training step, so the common
    case takes no tuple or closure).
    """
    non_blocking = device.type == "cuda"
    if isinstance(labels, torch.Tensor):
        labels = labels.to(device, non_blocking=non_blocking)
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.to(device, non_blocking=non_blocking)
        return inputs, labels, (inputs,)
    if isinstance(inputs, Mapping):
        moved: Any = {k: v.to(device, non_blocking=non_blocking)
                      if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        values = tuple(moved.values())
    else:
        moved = values = tuple(x.to(device, non_blocking=non_blocking)
                               if isinstance(x, torch.Tensor) else x for x in as_inputs(inputs))
    return moved, labels, values


def is_tensor_batch(data: Any) -> bool:
    """True for a tensor, a tuple of tensors or a dict of tensors (inputs batched on dim 0)."""
    if isinstance(data, torch.Tensor):
        return True
    values = list(data.values()) if isinstance(data, Mapping) else \
        list(data) if isinstance(data, tuple) else []
    return bool(values) and all(isinstance(v, torch.Tensor) for v in values)


def tensor_batch_size(data: Any) -> int:
    """The common dim-0 size of a tensor batch (see :func:`is_tensor_batch`).

    Raises:
        DataError: the tensors disagree on dim 0, or it is 0.
    """
    tensors = list(data.values()) if isinstance(data, Mapping) else as_inputs(data)
    size = tensors[0].shape[0] if tensors[0].dim() else 0
    if any(t.dim() == 0 or t.shape[0] != size for t in tensors):
        raise DataError(f"predict inputs disagree on the batch size (dim 0): "
                        f"{[tuple(t.shape) for t in tensors]}")
    if size == 0:
        raise DataError("predict inputs are empty (dim 0 is 0); give at least one example")
    return size


def slice_batch(data: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a tensor batch."""
    if isinstance(data, torch.Tensor):
        return data[start:stop]
    if isinstance(data, Mapping):
        return {k: v[start:stop] for k, v in data.items()}
    return tuple(v[start:stop] for v in data)


def to_cpu(value: Any) -> Any:
    """A model output, detached and on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (tuple, list)):
        return type(value)(to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    return value


def concat(outputs: list[Any]) -> Any:
    """Per-batch outputs joined along dim 0, keeping their tuple / dict structure."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, (tuple, list)):
        return type(first)(concat([o[i] for o in outputs]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: concat([o[k] for o in outputs]) for k in first}
    raise TrainingError(f"predict: the model returned a {type(first).__name__}; expected "
                        "tensors (or tuples/dicts of tensors)")
