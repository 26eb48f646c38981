"""One evaluation pass: every example of the set (or of its first ``steps`` batches) once.

Global position ``p`` of the evaluation order goes to worker ``p % world_size`` (see
:mod:`graft.train.sampling`); each worker counts its own examples and one all-reduce (plus a
gather for metric objects that keep whole predictions) merges them, so the metrics are those
one worker would compute over the whole set, whatever the batch size and the number of
workers, and however the last batch is cut.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, default_collate

from graft.errors import DataError
from graft.train.batches import call
from graft.train.custom_metrics import CustomMetrics
from graft.train.metrics import ClassificationMetrics
from graft.train.sampling import Stream, eval_index_batches, eval_stream_batches, resolve_data

if TYPE_CHECKING:
    from graft.train.estimator import Estimator

__all__ = ["evaluate"]


def evaluate(est: Estimator, data: Any, *, batch_size: int,
             steps: int | None = None) -> dict[str, Any]:
    """See :meth:`graft.train.estimator.Estimator.evaluate`."""
    strategy = est.strategy
    world, rank = strategy.world_size, strategy.rank
    dataset = resolve_data(data, "evaluation")
    if isinstance(dataset, Stream):
        collate = est.collate_fn or default_collate
        batches: Any = (collate(items) for items in eval_stream_batches(
            dataset, batch_size=batch_size, steps=steps, rank=rank, world=world))
        total = steps
    else:
        if len(dataset) < world:
            raise DataError(f"evaluation data has {len(dataset)} examples, fewer than the "
                            f"{world} workers; every worker needs one")
        index_batches = eval_index_batches(len(dataset), batch_size=batch_size, steps=steps,
                                           rank=rank, world=world)
        batches = DataLoader(dataset, batch_sampler=index_batches, num_workers=est.num_workers,
                             collate_fn=est.collate_fn, pin_memory=est.device.type == "cuda",
                             generator=torch.Generator().manual_seed(0))
        total = len(index_batches)
    est._restore_if_needed()
    strategy.broadcast_buffers(est.model)
    counts = ClassificationMetrics(est.metrics)
    custom = CustomMetrics(est.custom_metrics, est.device)
    bar = est._progress(total=total, desc="evaluate", unit="batch", leave=False)
    was_training = est.model.training
    est.model.eval()
    try:
        with torch.no_grad():
            for inputs, labels in batches:
                inputs, labels = est._to_device(inputs, labels)
                logits = call(est.model, inputs)
                loss = est._compute_loss(logits, labels, "evaluate")
                counts.update(logits, labels, loss)
                custom.update(logits, labels)
                bar.update(1)
    finally:
        bar.close()
        est.model.train(was_training)
    result = counts.compute(strategy.all_reduce_sum, est.device)
    result.update(custom.compute(strategy))
    result["step"] = est.step
    if result["examples"] == 0:
        raise DataError("evaluation counted no example; give at least one (inputs, label)")
    est._events.scalars("eval", est.step, {k: v for k, v in result.items()
                                           if k not in ("step", "examples")})
    est._events.flush()
    for callback in est.callbacks:
        callback.on_evaluate(est, result)
    return result
