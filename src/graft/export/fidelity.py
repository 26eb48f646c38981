"""Fidelity checks: a stored program must compute exactly what the eager model computes.

``graft.save`` runs each program it is about to store, from its JSON, over copies of the
model's tensors, and compares with the eager model bit for bit: the eval program's outputs;
the train programs' outputs, gradients and buffer updates (batch-norm statistics) under the
same random seed (dropout masks). A difference means the method depends on something
torch.export cannot capture (Python state, a global), and the module would silently compute
something else, so the save is refused.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from graft.errors import FormatError
from graft.export.state import ModelState
from graft.runtime.program import program_from_json

__all__ = ["GRAD_ATOL", "GRAD_RTOL", "check_eval", "check_train"]

_SEED = 20240917
#: How close gradients must be when the model's own backward cannot be kept (see check_train).
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5


def _bind(state: ModelState, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Program state: every stored tensor, and each alias bound to the same object."""
    bound = dict(tensors)
    bound.update({alias: tensors[canonical] for alias, canonical in state.aliases.items()})
    return bound


def _differs(got: torch.Tensor | None, want: torch.Tensor | None) -> str | None:
    if got is None or want is None:
        return None if got is None and want is None else "one side has no value"
    if got.shape != want.shape or got.dtype != want.dtype:
        return (f"{str(got.dtype).removeprefix('torch.')}{list(got.shape)} against "
                f"{str(want.dtype).removeprefix('torch.')}{list(want.shape)}")
    if torch.equal(got, want):  # one pass, no temporaries; NaNs fall through to the check
        return None
    same = got == want
    if got.is_floating_point():
        same |= got.isnan() & want.isnan()
    if bool(same.all()):
        return None
    gap = (got.double() - want.double()).abs().nan_to_num(float("inf")).max().item()
    return f"max difference {gap:.3g}"


def _refuse(key: str, variant: str, what: str, why: str) -> FormatError:
    return FormatError(f"signature {key!r}: the exported {variant} program's {what} differs "
                       f"from the eager model's ({why}); the method may depend on Python "
                       "state that torch.export cannot capture (a counter, a global, a "
                       "cached value); make it a pure function of its inputs and weights")


def check_eval(key: str, graph: Mapping[str, Any], constants: Mapping[str, torch.Tensor],
               state: ModelState, examples: Sequence[torch.Tensor],
               reference: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Refuse unless the eval program reproduces the eager outputs ``reference`` exactly."""
    program = program_from_json(graph, name=f"{key}.eval", train=False)
    # As when the reference was computed: grad mode on, parameters requiring grad as in the
    # model (attention picks another kernel when nothing needs a gradient).
    got = program(_bind(state, _copies(state)), constants, list(examples))
    for name, a, b in zip(names, got, reference, strict=True):
        why = _differs(a.detach(), b)
        if why:
            raise _refuse(key, "eval", f"output {name!r}", why)


def check_train(key: str, variant: str, wrapper: nn.Module, graph: Mapping[str, Any],
                constants: Mapping[str, torch.Tensor], state: ModelState,
                examples: Sequence[torch.Tensor], names: Sequence[str]) -> str:
    """Refuse unless a train program matches the eager model in its current (train) modes.

    Both run under the same seed over fresh copies of the weights; compared exactly: the
    outputs, the gradient of every parameter for a fixed random weighting of the outputs,
    and every buffer afterwards (the running statistics a train step updates).

    One exception: a model that defines its own backward (a ``torch.autograd.Function``,
    as BLOOM's GELU does) cannot keep it, because torch.export records the forward and the
    program is differentiated op by op; its gradients then agree to float rounding
    (``GRAD_RTOL``/``GRAD_ATOL``), not bit for bit.

    Returns:
        A note for the user when gradients are only close (``""`` when exact).
    """
    program = program_from_json(graph, name=f"{key}.{variant}", train=True)
    eager_tensors = _copies(state)
    program_tensors = _copies(state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        # tie_weights: a tied alias (not passed) follows the stored tensor, as in the model.
        eager = torch.func.functional_call(
            wrapper, {f"model.{k}": v for k, v in eager_tensors.items()}, tuple(examples),
            tie_weights=True, strict=False)
        torch.manual_seed(_SEED)
        got = program(_bind(state, program_tensors), constants, list(examples))
    for name, a, b in zip(names, got, eager, strict=True):
        why = _differs(a.detach(), b.detach())
        if why:
            raise _refuse(key, variant, f"output {name!r}", why)
    note = ""
    trained = [k for k, v in eager_tensors.items() if v.requires_grad]
    if trained:
        custom = _custom_backwards(eager)
        eager_grads = _grads(eager, [eager_tensors[k] for k in trained])
        program_grads = _grads(got, [program_tensors[k] for k in trained])
        worst = 0.0
        for name, a, b in zip(trained, program_grads, eager_grads):
            why = _differs(a, b)
            if why and custom and a is not None and b is not None and a.shape == b.shape \
                    and torch.allclose(a, b, rtol=GRAD_RTOL, atol=GRAD_ATOL):
                worst = max(worst, (a.double() - b.double()).abs().max().item())
                continue
            if why:
                raise _refuse(key, variant, f"gradient of {name!r}", why)
        if worst:
            note = (f"signature {key!r}: the model defines its own backward "
                    f"({', '.join(custom)}), which a program cannot keep; its {variant} "
                    f"gradients come from differentiating the forward and differ from the "
                    f"eager model's by up to {worst:.2g}")
    for name, kind in state.kinds.items():
        if kind == "buffer":
            why = _differs(program_tensors[name], eager_tensors[name])
            if why:
                raise _refuse(key, variant, f"update of buffer {name!r}", why)
    return note


def _custom_backwards(outputs: Sequence[torch.Tensor]) -> list[str]:
    """Names of the hand-written backward functions in the eager autograd graph."""
    stack = [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn]
    seen: set[int] = set()
    found: set[str] = set()
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        if isinstance(fn, torch.autograd.function.BackwardCFunction):
            found.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    return sorted(found)


def _copies(state: ModelState) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.tensors.items():
        copy = value.clone()
        if name in state.requires_grad:
            copy.requires_grad_(True)
        out[name] = copy
    return out


def _grads(outputs: Sequence[torch.Tensor],
           params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Gradients of a fixed random weighting of the outputs (every output contributes)."""
    gen = torch.Generator().manual_seed(_SEED)
    loss = None
    for out in outputs:
        if out.requires_grad and out.is_floating_point():
            weight = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
            term = (out * weight).sum()
            loss = term if loss is None else loss + term
    if loss is None:
        return [None] * len(params)
    return list(torch.autograd.grad(loss, list(params), allow_unused=True))
