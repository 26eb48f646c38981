"""Distribution strategies over torch.distributed: the same training code anywhere."""

from graft.distribute.batch_norm import SyncBatchNorm, convert_sync_batch_norm
from graft.distribute.data_parallel import DataParallel
from graft.distribute.launch import launch
from graft.distribute.strategy import OneDevice, Strategy, default_strategy, launched

__all__ = [
    "DataParallel",
    "OneDevice",
    "Strategy",
    "SyncBatchNorm",
    "convert_sync_batch_norm",
    "default_strategy",
    "launch",
    "launched",
]
