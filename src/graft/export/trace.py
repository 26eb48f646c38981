"""Driving ``torch.export`` for one signature: every program variant, checked and explained.

For each variant (``eval``, ``train``, ``train_frozen_bn``) the model is put in that mode,
traced with its named dimensions dynamic, encoded as ``graft.graph`` JSON with tied weights
bound to their stored name, and checked against the eager model (``export/fidelity.py``).
What torch.export learns or refuses is turned into Graft's terms: the range each named
dimension is valid for (reported when the model's code narrows it), a data-dependent branch
named by its line in the model's code, an eval-only module when only the train mode fails.
"""

from __future__ import annotations

import sysconfig
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from graft.errors import FormatError, SaveWarning
from graft.export.fidelity import check_eval, check_train
from graft.export.outputs import FlatOutputs, flat_values, flatten_outputs
from graft.export.program import program_to_json
from graft.export.signature import BoundInputs, Signature
from graft.export.state import ModelState
from graft.format.spec import TensorSpec, dtype_name
from graft.runtime.module import FROZEN_BN

__all__ = ["Traced", "trace_signature"]

# Frames in these trees are machinery; the line to show a user is the first one outside.
_TORCH = str(Path(torch.__file__).parent.resolve())
_MACHINERY = (_TORCH, *(str(Path(p).resolve()) for p in (
    Path(np.__file__).parent, Path(__file__).parents[1], sysconfig.get_paths()["stdlib"])))


@dataclass
class Traced:
    """One signature, exported: its programs and what was learned about it.

    Args:
        inputs: The signature's inputs and the examples it was traced with.
        programs: Variant -> graph JSON.
        constants: Variant -> the program's lifted tensor constants.
        outputs: Output name -> spec.
        structure: How the outputs nest (``format/structure.py``).
        reference: The eager eval outputs for the examples, one per output.
        dims: Named dimension -> (min, max) the programs are valid for, where narrower than
            (1, unbounded).
        eval_only: Why the train variants are missing (``""``: they are not).
    """

    inputs: BoundInputs
    programs: dict[str, dict[str, Any]]
    constants: dict[str, dict[str, torch.Tensor]]
    outputs: dict[str, TensorSpec]
    structure: Any
    reference: list[torch.Tensor]
    dims: dict[str, tuple[int, int | None]]
    eval_only: str = ""


class _Method(nn.Module):
    """Calls one method of the model from a flat tuple of tensors; returns a flat tuple.

    The first ``positional`` tensors go positionally, the rest by keyword under their input
    names, plus the fixed configuration keywords, exactly as the user's example call did.
    """

    def __init__(self, model: nn.Module, method: str, bound: BoundInputs) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.positional = bound.positional
        self.keywords = list(bound.specs)[bound.positional:]
        self.fixed = dict(bound.fixed)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = dict(zip(self.keywords, inputs[self.positional:]))
        out = getattr(self.model, self.method)(*inputs[: self.positional], **kwargs,
                                               **self.fixed)
        return tuple(flat_values(out))


def trace_signature(model: nn.Module, key: str, sig: Signature, bound: BoundInputs,
                    state: ModelState, variants: Sequence[str], train_required: bool) -> Traced:
    """Export ``sig`` in each of ``variants`` and check every program against eager.

    Args:
        train_required: A train variant that cannot be exported is an error; otherwise the
            signature becomes eval-only and ``Traced.eval_only`` says why.

    Raises:
        FormatError: the eval program (or a required train program) cannot be exported, or
            a program differs from the eager model.
    """
    from torch.export import Dim

    modes = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()
    wrapper = _Method(model, sig.method, bound)
    examples = bound.examples
    dynamic = tuple({axis: Dim.DYNAMIC for axis, d in enumerate(spec.shape)
                     if isinstance(d, str)} or None for spec in bound.specs.values())
    programs: dict[str, dict[str, Any]] = {}
    constants: dict[str, dict[str, torch.Tensor]] = {}
    dims: dict[str, tuple[int, int | None]] = {}
    where: dict[str, str] = {}
    eval_only = ""
    notes: list[str] = []
    try:
        model.eval()
        # Grad mode stays on, as when torch.export traces: some modules (MultiheadAttention)
        # take a different fused kernel under no_grad.
        kwargs = dict(zip(wrapper.keywords, examples[bound.positional:]))
        returned = getattr(model, sig.method)(*examples[: bound.positional], **kwargs,
                                               **bound.fixed)
        flat = flatten_outputs(key, sig.method, returned, sig.outputs)
        reference = [t.detach().clone() for t in flat_values(returned)]
        del returned
        batch_norms = [m for m in model.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for variant in variants:
            if variant == FROZEN_BN and not batch_norms:
                continue
            _set_mode(model, variant, batch_norms)
            try:
                ep = _export(wrapper, key, sig.method, variant, examples, dynamic)
            except FormatError as exc:
                if variant == "eval" or train_required:
                    raise
                eval_only = str(exc)
                break
            graph = _bind_aliases(program_to_json(ep, strip_prefix="model.",
                                                  input_names=list(bound.specs)), state)
            programs[variant] = graph
            constants[variant] = {k.removeprefix("model."): v.detach().clone()
                                  for k, v in ep.constants.items()
                                  if isinstance(v, torch.Tensor)}
            if variant == "eval":
                outputs = _output_specs(ep, bound.specs, flat)
                check_eval(key, graph, constants[variant], state, examples, reference,
                           flat.names)
            else:
                notes.append(check_train(key, variant, wrapper, graph, constants[variant],
                                         state, examples, flat.names))
            _narrow(dims, where, ep, bound.specs)
    finally:
        for module_name, module in model.named_modules():
            module.training = modes[module_name]
        torch.set_rng_state(rng)
    if eval_only:
        programs = {"eval": programs["eval"]}
        constants = {"eval": constants["eval"]}
    for note in dict.fromkeys(n for n in notes if n):
        warnings.warn(f"graft.save: {note}", SaveWarning, stacklevel=4)
    for dim, (low, high) in dims.items():
        upper = "any size" if high is None else str(high)
        source = where.get(dim, "location unknown")
        warnings.warn(f"graft.save: signature {key!r} takes '{dim}' from {low} to {upper} "
                      f"only, because the model's code limits it ({source}); calls outside "
                      "that range will be refused", SaveWarning, stacklevel=4)
    return Traced(bound, programs, constants, outputs, flat.structure, reference, dims,
                  eval_only)


def _set_mode(model: nn.Module, variant: str, batch_norms: list[nn.Module]) -> None:
    model.train(variant != "eval")
    if variant == FROZEN_BN:
        # Fine-tuning on small batches: dropout on, batch norm in inference mode (running
        # statistics used, never updated).
        for bn in batch_norms:
            bn.eval()


def _export(wrapper: nn.Module, key: str, method: str, variant: str,
            examples: tuple[torch.Tensor, ...], dynamic: tuple[Any, ...]) -> Any:
    """``torch.export.export`` with its failures said in one Graft sentence."""
    from torch.export import export
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    try:
        return export(wrapper, examples, dynamic_shapes=(dynamic,), strict=False)
    except GuardOnDataDependentSymNode as exc:
        raise FormatError(f"signature {key!r} ({method}) branches on the values of a tensor "
                          f"at {_user_line(exc)}; a module's program cannot depend on data. "
                          "Compute both branches and pick with torch.where, or move the "
                          "decision out of the model") from None
    except Exception as exc:  # torch raises many types; all mean "cannot export"
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise FormatError(f"signature {key!r} ({method}) cannot be exported in {variant} "
                          f"mode: {type(exc).__name__}: {first[:300]} (at {_user_line(exc)})"
                          ) from exc


def _user_line(exc: BaseException) -> str:
    """``file:line in function: code`` of the deepest frame outside torch, Graft and stdlib."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f.filename and not f.filename.startswith("<")
              and not str(Path(f.filename).resolve()).startswith(_MACHINERY)]
    if not frames:
        return "a line inside torch"
    return _describe(frames[-1])


def _describe(frame: Any) -> str:
    path = Path(frame.filename)
    # site-packages paths shortened to the package: transformers/models/bert/...
    parts = path.parts
    if "site-packages" in parts:
        path = Path(*parts[parts.index("site-packages") + 1:])
    code = f": `{frame.line.strip()}`" if getattr(frame, "line", None) else ""
    return f"{path}:{frame.lineno} in {frame.name}{code}"


def _bind_aliases(graph: dict[str, Any], state: ModelState) -> dict[str, Any]:
    """Point every parameter or buffer a program reads or updates at its stored name."""
    for entry in graph["inputs"]:
        if "target" in entry and entry.get("kind") in ("parameter", "buffer"):
            entry["target"] = state.canonical(entry["target"])
    for entry in graph["outputs"]:
        if entry.get("kind") == "buffer_mutation":
            entry["target"] = state.canonical(entry["target"])
    return graph


def _user_input_nodes(ep: Any) -> list[Any]:
    return [n for n in ep.graph.nodes
            if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs]


def _narrow(dims: dict[str, tuple[int, int | None]], where: dict[str, str], ep: Any,
            specs: dict[str, TensorSpec]) -> None:
    """Intersect ``dims`` with the range export proved each named dimension valid for.

    torch.export assumes sizes >= 2 while tracing (0 and 1 would specialise) but the graph
    it records runs for size 1 too, so a lower bound of 2 is recorded as 1. ``where`` gets
    the model's line that set each narrowed bound.
    """
    for node, spec in zip(_user_input_nodes(ep), specs.values()):
        for size, dim in zip(node.meta["val"].shape, spec.shape):
            if not (isinstance(size, torch.SymInt) and isinstance(dim, str)):
                continue
            ranges = ep.range_constraints.get(size.node.expr)
            lower, upper = 1, None
            if ranges is not None:
                lower = max(1, _finite(ranges.lower) or 0)
                lower = 1 if lower <= 2 else lower
                upper = _finite(ranges.upper)
            if (lower, upper) == (1, None):
                continue
            low, high = dims.get(dim, (1, None))
            if upper is not None:
                high = upper if high is None else min(high, upper)
            dims[dim] = (max(low, lower), high)
            where.setdefault(dim, _range_source(size, lower > 1))


def _range_source(size: torch.SymInt, lower: bool) -> str:
    """Where the model's code narrowed ``size``'s range (torch's shape environment notes it)."""
    try:
        node = size.node
        slocs = node.shape_env.var_to_range_sloc.get(node.expr)
        sloc = slocs.lower if lower else slocs.upper
        frame = sloc.framework_loc
    except AttributeError:  # private API: degrade to no location rather than fail a save
        return "location unknown"
    if isinstance(frame, traceback.FrameSummary):
        if str(Path(frame.filename).resolve()).startswith(_TORCH):
            # torch records only its own frame for an operator's size rule (a convolution
            # needs at least kernel-size samples); the model line that called it is lost.
            return ("an operator's size rule, such as slicing a fixed-size position table or "
                    "a convolution's kernel size; torch does not record the model's line")
        return _describe(frame)
    return str(sloc).strip("() ") or "location unknown"


def _finite(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None  # int_oo: unbounded
    return number if abs(number) < 2**31 else None


def _output_specs(ep: Any, specs: dict[str, TensorSpec],
                  flat: FlatOutputs) -> dict[str, TensorSpec]:
    import sympy

    symbols: dict[Any, Any] = {}
    for node, spec in zip(_user_input_nodes(ep), specs.values()):
        for size, dim in zip(node.meta["val"].shape, spec.shape):
            if isinstance(size, torch.SymInt) and isinstance(dim, str):
                symbols.setdefault(size.node.expr, sympy.Symbol(dim))
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    user_outputs = [v for v, s in zip(out_node.args[0], ep.graph_signature.output_specs)
                    if s.kind.name == "USER_OUTPUT"]
    result = {}
    for out_name, value in zip(flat.names, user_outputs, strict=True):
        val = value.meta["val"]
        shape: list[int | str] = []
        for size in val.shape:
            if isinstance(size, torch.SymInt):
                shape.append(str(size.node.expr.xreplace(symbols)).replace(" ", ""))
            else:
                shape.append(int(size))
        result[out_name] = TensorSpec(dtype_name(val.dtype), tuple(shape))
    return result
