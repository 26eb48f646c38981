"""Synchronised batch norm: statistics over the global batch, on GPUs and on CPUs (gloo).

With data parallelism every worker sees ``1/N`` of each global batch, and plain batch norm
normalises with the statistics of that share. :class:`SyncBatchNorm` computes the mean and
variance over the whole global batch instead, so ``N`` workers on shares compute what one
worker computes on the whole batch. torch's ``nn.SyncBatchNorm`` does this with CUDA kernels
only (it refuses CPU tensors, and DistributedDataParallel refuses it on CPU modules); this
one is written with differentiable all-reduces (two in the forward pass, two in the backward
pass), which every backend runs, on every device.

While ``torch.export`` traces the model (``Estimator.export`` on the chief) it is plain batch
norm: an exported module runs in one process and must not wait for other workers.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batch_norm", "local_statistics"]

# Set while one worker runs the model alone (the chief exporting it): no collectives then.
_LOCAL_ONLY = contextvars.ContextVar("graft_sync_batch_norm_local", default=False)


@contextlib.contextmanager
def local_statistics() -> Iterator[None]:
    """Within this block, :class:`SyncBatchNorm` in train mode uses this process's batch only.

    For code that one worker runs while the others wait, such as ``graft.save`` checking the
    train program against the eager model on the chief: a collective there would wait for
    workers that never join it.
    """
    token = _LOCAL_ONLY.set(True)
    try:
        yield
    finally:
        _LOCAL_ONLY.reset(token)


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics are those of the global batch across workers.

    Same arguments as ``nn.BatchNorm2d`` plus ``process_group``; the same parameters,
    buffers and ``state_dict`` keys as ``nn.BatchNorm1d/2d/3d``, so checkpoints move freely
    between them. Outside training, with one worker, or while exporting, it is plain batch
    norm.

    Args:
        num_features: Channels ``C`` of a ``(B, C, ...)`` input.
        eps: Added to the variance for numerical stability.
        momentum: Running-statistics update factor (None: cumulative average).
        affine: Learn a per-channel scale and shift.
        track_running_stats: Keep running mean and variance for evaluation.
        process_group: Synchronise over this group; None: all workers.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: object = None, device: object = None,
                 dtype: object = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects a (B, C, ...) input with at least 2 "
                             f"dims; got {input.dim()}D {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # (B, C, ...) -> (B, C, ...)
        if self.training and not torch.compiler.is_exporting() and not _LOCAL_ONLY.get() \
                and self._world_size() > 1:
            return self._synchronised(input)
        return super().forward(input)

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group or dist.group.WORLD)

    def _synchronised(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        group = self.process_group or dist.group.WORLD
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() // input.shape[1]], dtype=torch.float64,
                             device=input.device)
        dist.all_reduce(count, group=group)
        n = int(count.item())
        if n <= 1:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel when "
                             f"training over all workers; got input {tuple(input.shape)} "
                             "on each. Use a larger batch")
        if self.running_mean is None or not self.track_running_stats:
            factor = 0.0
        else:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        # The gradient of an all-reduced sum is the all-reduced gradient: autograd through
        # these two sums gives exactly the gradient of the loss summed over workers.
        mean = _AllReduceSum.apply(input.sum(dims), group) / n  # (C,)
        centered = input - mean.reshape(shape)
        var = _AllReduceSum.apply((centered * centered).sum(dims), group) / n  # (C,), biased
        out = centered * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.running_mean is not None and self.track_running_stats:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return out


class _AllReduceSum(torch.autograd.Function):
    """The sum over workers, differentiable: its gradient is the sum of the gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total, None


def convert_sync_batch_norm(model: nn.Module, process_group: object = None) -> int:
    """Replace every batch-norm layer inside ``model`` by a :class:`SyncBatchNorm`, in place.

    The new layers take over the old ones' parameter and buffer objects (an optimizer built
    before still updates them) and their train/eval mode.

    Args:
        model: The model; it is changed in place.
        process_group: Synchronise over this group; None: all workers.

    Returns:
        How many layers were converted (0 warns: batch norm inside a hub module's exported
        program is not an ``nn.BatchNorm`` layer and cannot be synchronised).

    Raises:
        ValueError: ``model`` itself is a batch-norm layer (wrap it in ``nn.Sequential``).
    """
    if isinstance(model, _BatchNorm):
        raise ValueError(f"sync_batch_norm: the model itself is a {type(model).__name__}, "
                         "which cannot be replaced in place; wrap it, e.g. "
                         "nn.Sequential(model)")
    converted = _convert(model, process_group)
    if converted == 0:
        warnings.warn("sync_batch_norm=True, but the model has no nn.BatchNorm layers to "
                      "synchronise (batch norm inside a hub module's exported program "
                      "is not one); each worker normalises with its own statistics",
                      stacklevel=3)
    return converted


def _convert(module: nn.Module, process_group: object) -> int:
    converted = 0
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and type(child) is not SyncBatchNorm:
            if isinstance(child, nn.modules.lazy.LazyModuleMixin) \
                    and child.has_uninitialized_params():
                raise ValueError(f"sync_batch_norm: layer {name!r} is a lazy batch norm "
                                 "that has not seen an input yet; run one forward pass "
                                 "first or use nn.BatchNorm2d(channels)")
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats, process_group
                                 if process_group is not None else getattr(child,
                                                                           "process_group",
                                                                           None))
            if child.affine:
                sync.weight, sync.bias = child.weight, child.bias
            if child.track_running_stats:
                sync.running_mean = child.running_mean
                sync.running_var = child.running_var
                sync.num_batches_tracked = child.num_batches_tracked
            sync.train(child.training)
            setattr(module, name, sync)
            converted += 1
        else:
            converted += _convert(child, process_group)
    return converted
