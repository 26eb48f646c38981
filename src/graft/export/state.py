"""The tensors a saved module stores: every parameter and buffer once, tied names as aliases."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ModelState", "model_state", "tensor_sha256"]


@dataclass(frozen=True)
class ModelState:
    """Detached copies of a model's tensors, by fully-qualified name.

    Args:
        tensors: Stored name -> copy. A tensor registered under several names (an LM head
            tied to the input embedding, T5's shared embedding) is stored once, under the
            name ``named_parameters()`` gives it first.
        kinds: Stored name -> ``"parameter"`` or ``"buffer"``.
        aliases: Every other name of a tied tensor -> its stored name.
        requires_grad: Stored names of the parameters that require grad in the model (kernel
            choices, e.g. attention's, depend on it; the fidelity checks mirror it).
    """

    tensors: dict[str, torch.Tensor]
    kinds: dict[str, str]
    aliases: dict[str, str]
    requires_grad: frozenset[str] = frozenset()

    def canonical(self, name: str) -> str:
        """The stored name of the tensor called ``name``."""
        return self.aliases.get(name, name)


def model_state(model: nn.Module) -> ModelState:
    """Collect ``model``'s parameters and buffers, tying names that share one tensor object."""
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    named = [(k, v, "parameter") for k, v in model.named_parameters(remove_duplicate=False)]
    named += [(k, v, "buffer") for k, v in model.named_buffers(remove_duplicate=False)]
    for key, value, kind in named:
        # Identity, not storage: HF ties by registering one Parameter under two names.
        if id(value) in first:
            aliases[key] = first[id(value)]
            continue
        first[id(value)] = key
        tensors[key], kinds[key] = value.detach().clone(), kind
    grad = frozenset(k for k, v, kind in named if kind == "parameter" and v.requires_grad
                     and k in tensors)
    return ModelState(tensors, kinds, aliases, grad)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw little-endian bytes in C order."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(memoryview(data.numpy())).hexdigest()
