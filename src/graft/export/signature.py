"""``graft.Signature``, and how a signature's inputs are named, typed and fed to the model.

A signature's inputs are the tensors the user's plain call passes: ``model(ids,
attention_mask=mask)`` gives the inputs ``input_ids`` (named after the method's parameter)
and ``attention_mask`` (the keyword). Keyword-only arguments stay keywords when the program
is traced, so a model whose ``attention_mask`` comes after a cache argument needs no wrapper.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from graft.errors import FormatError, SignatureError
from graft.format.spec import ImagePreprocess, TensorSpec, TextPreprocess, dtype_name

__all__ = ["BoundInputs", "Signature", "bind_inputs", "normalise_signatures"]

_EXAMPLE_SIZES = {"batch": 2, "seq": 8}
# Keyword values that are configuration, not data: traced as constants of the program.
_FIXED_TYPES = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Signature:
    """Declares one signature of a module being saved.

    Args:
        method: The model's method to export (``"forward"``, ``"features"``, ...).
        inputs: Input name -> spec (``"float32[batch,3,224,224]"``); named dimensions become
            dynamic. Inputs it leaves out are inferred from the examples (named after the
            method's parameters or the keywords, dimension 0 named ``batch``, the rest
            fixed). ``None``: all inferred.
        outputs: Names for the returned tensors, in order; ``None``: named by where they sit
            (``output``, ``output_0``, a dict's keys, ``hidden_states.0``).
        example_inputs: Positional tensors to trace with; ``None``: synthesised from
            ``inputs``.
        preprocess: Declarative preprocessing applied when a caller passes raw data.
        description: One line for people.
        example_kwargs: Keyword arguments to trace with (``{"attention_mask": mask}``).
            Tensors become inputs named after their keyword; ``bool``/``int``/``float``/
            ``str``/``None`` values are configuration, fixed in the program
            (``output_hidden_states=True``).
    """

    method: str = "forward"
    inputs: Mapping[str, str | TensorSpec] | None = None
    outputs: Sequence[str] | None = None
    example_inputs: tuple[torch.Tensor, ...] | None = None
    preprocess: ImagePreprocess | TextPreprocess | None = None
    description: str = ""
    example_kwargs: Mapping[str, Any] | None = field(default=None)


@dataclass(frozen=True)
class BoundInputs:
    """A signature's inputs, ready to trace.

    Args:
        specs: Input name -> spec, in program order (positional inputs first).
        examples: One example tensor per input, same order.
        positional: How many of the inputs the method takes positionally; the rest are
            passed by keyword, under their names.
        fixed: Non-tensor keyword arguments, passed on every call as traced.
    """

    specs: dict[str, TensorSpec]
    examples: tuple[torch.Tensor, ...]
    positional: int
    fixed: dict[str, Any]


def normalise_signatures(signatures: Mapping[str, Signature | str] | None, example_inputs: Any,
                         example_kwargs: Mapping[str, Any] | None,
                         inputs: Mapping[str, str | TensorSpec] | None) -> dict[str, Signature]:
    """Fill each signature's examples from ``graft.save``'s own arguments where it has none."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        raise FormatError(f"example_inputs must be a tensor or a tuple of tensors, got "
                          f"{type(example_inputs).__name__}")
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise FormatError(f"example_kwargs must be a dict of keyword arguments, got "
                          f"{type(example_kwargs).__name__}")
    given = example_inputs is not None or example_kwargs is not None
    if signatures is None:
        if not given and inputs is None:
            raise FormatError("save needs example_inputs=(x,) (and/or example_kwargs={...}) "
                              "to trace forward, or signatures={...} with input specs")
        return {"forward": Signature("forward", inputs=inputs,
                                     example_inputs=_tuple(example_inputs),
                                     example_kwargs=example_kwargs)}
    if not signatures:
        raise FormatError("signatures is empty; declare at least one")
    out = {}
    for key, sig in signatures.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise FormatError(f"signature name {key!r} must be an identifier")
        sig = Signature(sig) if isinstance(sig, str) else sig
        if not isinstance(sig, Signature):
            raise FormatError(f"signature {key!r} must be a graft.Signature or a method "
                              f"name, got {type(sig).__name__}")
        if sig.example_inputs is None and sig.example_kwargs is None and sig.inputs is None:
            if not given:
                raise FormatError(f"signature {key!r} has neither inputs specs nor example "
                                  "inputs; give Signature(inputs={...}) or example_inputs")
            sig = replace(sig, example_inputs=_tuple(example_inputs),
                          example_kwargs=example_kwargs)
        out[key] = sig
    return out


def _tuple(value: Any) -> tuple[Any, ...] | None:
    return None if value is None else tuple(value)


def bind_inputs(model: nn.Module, key: str, sig: Signature) -> BoundInputs:
    """Name, type and order a signature's inputs; synthesise examples the user left out.

    Raises:
        FormatError: the method does not exist, an example is not a tensor, or the declared
            specs disagree with the examples.
    """
    method = getattr(model, sig.method, None)
    if not callable(method):
        raise FormatError(f"signature {key!r} names method {sig.method!r}, which "
                          f"{type(model).__name__} does not have")
    params = inspect.signature(method).parameters
    declared = {k: TensorSpec.of(v) for k, v in (sig.inputs or {}).items()}
    if sig.example_inputs is None and sig.example_kwargs is None:
        if not declared:
            raise FormatError(f"signature {key!r} has no inputs: give Signature(inputs=...) "
                              "or example inputs")
        examples = tuple(_synthesise(s) for s in declared.values())
        # Synthesised inputs go by keyword where the method only takes them that way.
        keyword = [n for n in declared
                   if n in params and params[n].kind == inspect.Parameter.KEYWORD_ONLY]
        ordered = [n for n in declared if n not in keyword] + keyword
        by_name = dict(zip(declared, examples))
        specs = {n: declared[n] for n in ordered}
        return _checked(key, specs, tuple(by_name[n] for n in ordered),
                        len(ordered) - len(keyword), {})
    positional = tuple(sig.example_inputs or ())
    tensors: dict[str, torch.Tensor] = {}
    fixed: dict[str, Any] = {}
    for name, value in (sig.example_kwargs or {}).items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif isinstance(value, _FIXED_TYPES):
            fixed[name] = value
        else:
            raise FormatError(f"example keyword {name!r} of signature {key!r} is a "
                              f"{type(value).__name__}; keyword inputs must be tensors, or "
                              "bool/int/float/str/None configuration")
    names = _positional_names(method, params, key, positional, declared, tensors)
    for name, value in zip(names, positional):
        if not isinstance(value, torch.Tensor):
            raise FormatError(f"example input {name!r} of signature {key!r} is a "
                              f"{type(value).__name__}; only tensors can be inputs (pass "
                              "configuration by keyword in example_kwargs)")
    all_names = [*names, *tensors]
    if len(set(all_names)) != len(all_names):
        raise FormatError(f"signature {key!r}: an input is given both positionally and by "
                          f"keyword ({all_names})")
    unknown = sorted(set(declared) - set(all_names))
    if unknown:
        raise FormatError(f"signature {key!r} declares specs for {unknown}, which are not "
                          f"among its example inputs {all_names}")
    examples = (*positional, *tensors.values())
    specs = {n: declared.get(n) or _inferred(x) for n, x in zip(all_names, examples)}
    return _checked(key, specs, tuple(examples), len(positional), fixed)


def _positional_names(method: Any, params: Mapping[str, inspect.Parameter], key: str,
                      positional: tuple[Any, ...], declared: Mapping[str, TensorSpec],
                      keywords: Mapping[str, Any]) -> list[str]:
    # Spec names the user wrote for the positional inputs win (renaming, as in
    # Signature(inputs={"images": ...})); else the method's own parameter names.
    names = [p.name for p in params.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][: len(positional)]
    own = [n for n in declared if n not in keywords]
    if own and len(own) == len(positional) and set(own) != set(names):
        return own
    return names + [f"input_{i}" for i in range(len(names), len(positional))]


def _inferred(example: torch.Tensor) -> TensorSpec:
    shape = tuple(["batch", *example.shape[1:]]) if example.dim() else ()
    return TensorSpec(dtype_name(example.dtype), shape)


def _checked(key: str, specs: dict[str, TensorSpec], examples: tuple[torch.Tensor, ...],
             positional: int, fixed: dict[str, Any]) -> BoundInputs:
    for name in specs:
        if not name.isidentifier():
            raise FormatError(f"signature {key!r}: input name {name!r} is not an identifier")
    sizes: dict[str, int] = {}
    for (input_name, spec), example in zip(specs.items(), examples):
        try:
            spec.check(input_name, example, sizes)
        except SignatureError as exc:
            raise FormatError(f"signature {key!r}: the example does not match its own "
                              f"spec: {exc}") from None
    return BoundInputs(specs, _widen(specs, examples), positional, fixed)


def _synthesise(spec: TensorSpec) -> torch.Tensor:
    shape = [d if isinstance(d, int) else _EXAMPLE_SIZES.get(d, 3) for d in spec.shape]
    if spec.torch_dtype.is_floating_point:
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(spec.torch_dtype)
    if spec.torch_dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.ones(shape, dtype=spec.torch_dtype)


def _widen(specs: dict[str, TensorSpec],
           examples: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Repeat examples along named dimensions of size 1.

    torch.export specialises a dimension it sees at size 0 or 1, so a batch of one example
    could never become a dynamic ``batch``.
    """
    widened = []
    for spec, example in zip(specs.values(), examples):
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str) and example.shape[axis] == 1:
                example = torch.cat([example, example], dim=axis)
        widened.append(example)
    return tuple(widened)
