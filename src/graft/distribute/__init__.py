"""Distribution strategies over torch.distributed: the same training code anywhere."""

from graft.distribute.strategy import OneDevice, Strategy, default_strategy

__all__ = ["OneDevice", "Strategy", "default_strategy"]
