"""``graft.losses``: the maximum-likelihood loss family (defined in ``graft.train.losses``)."""

from graft.train.losses import *  # noqa: F403
from graft.train.losses import __all__  # noqa: F401
