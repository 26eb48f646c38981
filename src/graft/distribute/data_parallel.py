"""DataParallel: DistributedDataParallel over torch.distributed, one process per device.

One process per GPU (NCCL) or several processes on CPUs (gloo), on one node or several: the
process group comes from the launcher's environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``, as ``graft launch`` sets them), or is a
one-process group when the script runs on its own. The user's model, loss, optimizer and data
stay the same; the :class:`~graft.train.estimator.Estimator` asks this strategy to wrap the
model, shard the data, sum metrics and keep side effects on the chief.

Failures end in seconds, not after torch's default 30-minute collective timeout:

- every collective of training (gradient all-reduce, loss check, metric sums, batch-norm
  statistics) fails after ``timeout`` seconds (``GRAFT_COLLECTIVE_TIMEOUT``, default 60) when
  a worker stops answering;
- around the chief's side effects (checkpoint writes, ``export``) the other workers wait up to
  ``chief_timeout`` seconds (``GRAFT_CHIEF_TIMEOUT``, default 600), since writing a large
  checkpoint legitimately takes a while;
- under ``graft launch`` a worker that dies is noticed by the launcher's agent within a
  second, and the whole worker group is stopped and restarted (or the job fails) at once.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from graft.distribute.strategy import Strategy
from graft.settings import CHIEF_TIMEOUT, COLLECTIVE_TIMEOUT, chief_timeout, collective_timeout

__all__ = [
    "CHIEF_TIMEOUT",
    "COLLECTIVE_TIMEOUT",
    "DataParallel",
    "chief_timeout",
    "collective_timeout",
]


_BACKENDS = ("gloo", "nccl", "mpi", "ucc", "xccl")


def _check_seconds(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (math.isfinite(value) and value > 0):
        raise ValueError(f"DataParallel({name}={value!r}): expected a positive number of "
                         f"seconds, e.g. {name}=60")
    return float(value)


class DataParallel(Strategy):
    """Data parallelism with ``DistributedDataParallel``: one process per device.

    Every worker holds the whole model; each step, each takes its ``1/N`` share of the global
    batch, and gradients are averaged over workers in the backward pass, so ``N`` workers on
    shares of a global batch compute the step one worker computes on the whole batch.

    Args:
        device: Where this worker computes. None: ``cuda:$LOCAL_RANK`` when CUDA is
            available, else ``"cpu"``. ``"cpu"`` forces CPU workers on a GPU machine.
        backend: The ``torch.distributed`` backend. None: NCCL for CUDA devices, gloo for CPU.
        sync_batch_norm: Replace the model's batch-norm layers by
            :class:`~graft.distribute.batch_norm.SyncBatchNorm`, which normalises with the
            statistics of the global batch (on GPUs and CPUs).
        find_unused_parameters: Passed to DDP; needed when some parameters get no gradient
            in a step.
        timeout: Seconds before a collective that a worker does not join fails. None:
            ``$GRAFT_COLLECTIVE_TIMEOUT``, default 60.
        chief_timeout: Seconds the other workers wait while the chief writes a checkpoint
            or exports. None: ``$GRAFT_CHIEF_TIMEOUT``, default 600.

    Raises:
        ValueError: an argument is malformed.
        RuntimeError: (on :meth:`setup`) the launcher's environment is incomplete, or this
            worker's GPU does not exist.
    """

    def __init__(self, *, device: str | torch.device | None = None, backend: str | None = None,
                 sync_batch_norm: bool = False, find_unused_parameters: bool = False,
                 timeout: float | None = None, chief_timeout: float | None = None) -> None:
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"DataParallel(device={device!r}) is not a device; use None "
                                 "(one GPU per worker if there are GPUs), 'cpu' or 'cuda'"
                                 ) from exc
            if device.type == "cuda" and device.index is not None:
                raise ValueError(f"DataParallel(device={str(device)!r}): each worker uses "
                                 "cuda:$LOCAL_RANK; pass device='cuda' (or None)")
        if backend is not None and backend not in _BACKENDS:
            raise ValueError(f"DataParallel(backend={backend!r}): expected one of "
                             f"{list(_BACKENDS)}, or None (NCCL on GPUs, gloo on CPUs)")
        self._requested_device = device
        self._backend = backend
        self.sync_batch_norm = bool(sync_batch_norm)
        self.find_unused_parameters = bool(find_unused_parameters)
        self._timeout = _check_seconds("timeout", timeout)
        self._chief_timeout = _check_seconds("chief_timeout", chief_timeout)
        self._device: torch.device | None = None
        self._chief_group: Any = None
        self._owns_group = False
        self._ready = False

    # -- set-up ---------------------------------------------------------------------------

    @property
    def timeout(self) -> float:
        """Seconds before a stalled collective fails."""
        return self._timeout if self._timeout is not None else collective_timeout()

    @property
    def chief_timeout(self) -> float:
        """Seconds the other workers wait for the chief's side effects."""
        return self._chief_timeout if self._chief_timeout is not None else chief_timeout()

    @property
    def local_rank(self) -> int:
        """This worker's index among the workers of its node (``$LOCAL_RANK``)."""
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def backend(self) -> str:
        """The ``torch.distributed`` backend in use (or that :meth:`setup` will use)."""
        if self._ready:
            return dist.get_backend()
        return self._backend or ("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = self._pick_device()
        return self._device

    def _pick_device(self) -> torch.device:
        requested = self._requested_device
        if requested is None:
            requested = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if requested.type != "cuda":
            return requested
        if not torch.cuda.is_available():
            raise RuntimeError("DataParallel(device='cuda'): CUDA is not available on this "
                               "machine; use DataParallel() or device='cpu'")
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise RuntimeError(f"DataParallel: local rank {self.local_rank} has no GPU; this "
                               f"node has {count}. Launch at most {count} workers per node "
                               f"(graft launch --nproc-per-node {count})")
        return torch.device("cuda", self.local_rank)

    @property
    def world_size(self) -> int:
        if self._ready:
            return dist.get_world_size()
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def rank(self) -> int:
        if self._ready:
            return dist.get_rank()
        return int(os.environ.get("RANK", "0"))

    def setup(self) -> None:
        """Join the process group the launcher's environment describes (or start a
        one-process group), and pin this worker to its GPU. Idempotent; a process group
        that is already initialised is used as it is."""
        if self._ready:
            return
        device = self.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_available():
            raise RuntimeError("DataParallel: this PyTorch build has no torch.distributed")
        timeout = datetime.timedelta(seconds=self.timeout)
        if not dist.is_initialized():
            backend = self._backend or ("nccl" if device.type == "cuda" else "gloo")
            if backend == "nccl":
                # A timed-out NCCL collective tears the process down (the launcher then
                # restarts the group) instead of leaving it hanging.
                os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
            options: dict[str, Any] = {"backend": backend, "timeout": timeout}
            if device.type == "cuda":
                options["device_id"] = device
            if _launched_env():
                missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
                if missing:
                    raise RuntimeError(f"DataParallel: RANK and WORLD_SIZE are set but "
                                       f"{' and '.join(missing)} is not; start workers with "
                                       "`graft launch` (or torchrun), which sets them all")
                dist.init_process_group(init_method="env://", **options)
            else:  # a script run on its own: a group of one, no network
                dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1,
                                        **options)
            self._owns_group = True
        if dist.get_world_size() > 1:
            # Barriers around chief-only writes run on their own CPU group, whose timeout
            # (chief_timeout) may be longer than that of training collectives.
            self._chief_group = dist.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=self.chief_timeout))
        self._ready = True

    def teardown(self) -> None:
        """Leave the process group (destroying it if :meth:`setup` created it). Idempotent."""
        if not self._ready:
            return
        self._ready = False
        self._chief_group = None
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    # -- training -------------------------------------------------------------------------

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to this worker's device and wrap it in DistributedDataParallel
        (after converting its batch norm when ``sync_batch_norm``). Every worker starts from
        the chief's parameters and buffers."""
        from torch.nn.parallel import DistributedDataParallel

        from graft.distribute.batch_norm import convert_sync_batch_norm

        self.setup()
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"model {type(model).__name__} has no trainable parameters; "
                             "load hub modules with trainable=True or add a trainable head")
        if self.sync_batch_norm:
            convert_sync_batch_norm(model)
        model.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids,
                                       find_unused_parameters=self.find_unused_parameters)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self._chief_group)

    def gather_states(self, state: Any) -> list[Any]:
        if self.world_size == 1:
            return [json.loads(json.dumps(_to_json(state)), object_hook=_from_json)]
        payload = json.dumps(_to_json(state)).encode("utf-8")
        device = self.device
        size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = max(int(s.item()) for s in sizes)
        buffer = torch.zeros(longest, dtype=torch.uint8)
        buffer[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        buffer = buffer.to(device)
        buffers = [torch.empty_like(buffer) for _ in range(self.world_size)]
        dist.all_gather(buffers, buffer)
        return [json.loads(b[:int(n.item())].cpu().numpy().tobytes().decode("utf-8"),
                           object_hook=_from_json) for b, n in zip(buffers, sizes)]

    def broadcast_buffers(self, model: nn.Module) -> None:
        if self.world_size == 1:
            return
        with torch.no_grad():
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def __repr__(self) -> str:
        return (f"DataParallel(device={str(self.device)!r}, backend={self.backend!r}, "
                f"rank={self.rank}, world_size={self.world_size}, "
                f"sync_batch_norm={self.sync_batch_norm})")


def _launched_env() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


# -- JSON with tensors, for gather_states (never pickle) ---------------------------------------


def _to_json(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        return {"$tensor": [str(value.dtype).removeprefix("torch."), list(value.shape),
                            base64.b64encode(raw).decode("ascii")]}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError(f"gather_states: dict keys must be str; got {list(value)[:5]}")
        return {k: _to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"gather_states: a {type(value).__name__} is neither a tensor nor a JSON "
                     "value")


def _from_json(obj: dict[str, Any]) -> Any:
    if set(obj) != {"$tensor"}:
        return obj
    dtype_name, shape, data = obj["$tensor"]
    dtype = getattr(torch, dtype_name)
    raw = base64.b64decode(data)
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
