"""``Estimator.predict`` and ``Estimator.export``: using and publishing the trained model."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from graft.distribute.batch_norm import local_statistics
from graft.train.batches import call, concat, is_tensor_batch, slice_batch, tensor_batch_size, \
    to_cpu
from graft.train.checks import check_int
from graft.train.sampling import Stream, resolve_data

if TYPE_CHECKING:
    from graft.train.estimator import Estimator

__all__ = ["Inference"]


class Inference:
    """``predict`` and ``export`` (a base class of the Estimator)."""

    def predict(self: Estimator, data: Any, *, batch_size: int = 32) -> Any:
        """Run the model in eval mode over ``data`` and return its outputs, in order.

        Args:
            data: Inputs batched along dim 0: a tensor, a tuple of tensors (``model(*xs)``)
                or a dict of tensors (``model(**xs)``); or ``(inputs, label)`` data (labels
                ignored): map-style, a stream, or an input_fn returning one.
            batch_size: Examples per forward pass.

        Returns:
            The model's raw outputs for all examples, concatenated along dim 0 on the CPU:
            logits for a classifier (``torch.softmax(out, -1)`` gives probabilities). A
            model returning a tuple or dict gives a tuple or dict of such tensors. Every
            worker predicts all of ``data``.
        """
        check_int("batch_size", batch_size, 1, "Use e.g. batch_size=64.")
        if is_tensor_batch(data):
            size = tensor_batch_size(data)
            batches: Any = (slice_batch(data, i, i + batch_size)
                            for i in range(0, size, batch_size))
            total: int | None = math.ceil(size / batch_size)
        else:
            dataset = resolve_data(data, "predict")
            if isinstance(dataset, Stream):
                loader: Any = DataLoader(_Pairs(dataset), batch_size=batch_size,
                                         collate_fn=self.collate_fn)
                total = None
            else:
                loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                    num_workers=self.num_workers, collate_fn=self.collate_fn)
                total = len(loader)
            batches = (inputs for inputs, _ in loader)
        self._restore_if_needed()
        outputs: list[Any] = []
        bar = self._progress(total=total, desc="predict", unit="batch", leave=False)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for inputs in batches:
                    inputs, _ = self._to_device(inputs, None)
                    outputs.append(to_cpu(call(self.model, inputs)))
                    bar.update(1)
        finally:
            bar.close()
            self.model.train(was_training)
        return concat(outputs)

    def export(self: Estimator, handle: str | os.PathLike[str], *, signatures: Any = None,
               example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
               **save_options: Any) -> Any:
        """Save the trained model as a hub module with :func:`graft.save`.

        The model (not its distributed or compiled wrapper) is exported from the CPU in eval
        mode, then put back where it was. Hub modules inside it become its parents.

        Args:
            handle: ``"name@version"`` (into the local store) or a directory path (then
                pass ``name=`` and ``version=``).
            signatures: As for :func:`graft.save`; None: ``forward`` only.
            example_inputs: Inputs to trace with; None: two examples of the first batch
                the Estimator saw (in train, evaluate or predict).
            **save_options: Passed to :func:`graft.save` (``name``, ``version``,
                ``description``, ``license``, ``trainable``, ``assets``, ``store``, ...).

        Returns:
            The :class:`graft.SavedModule` on the chief worker, None on the others (which
            wait until it is written).
        """
        from graft.export.save import save

        self._restore_if_needed()
        if example_inputs is None and signatures is None:
            example_inputs = self._example_inputs
        saved = None
        if self.strategy.is_chief:
            model = self.model
            device = next(iter(model.parameters()), torch.empty(0)).device
            was_training = model.training
            try:
                if device.type != "cpu":
                    model.to("cpu")
                model.eval()
                with local_statistics():  # the other workers are waiting at the barrier
                    saved = save(model, handle, signatures=signatures,
                                 example_inputs=example_inputs, **save_options)
            finally:
                model.train(was_training)
                if device.type != "cpu":
                    model.to(device)
        self.strategy.barrier()
        return saved


class _Pairs(torch.utils.data.IterableDataset):
    """One pass over a stream's first epoch, for predict."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def __iter__(self) -> Any:
        return self.stream.open(0)
