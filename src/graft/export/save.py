"""``graft.save``: turn an ``nn.Module`` into a code-free module on disk or in the store."""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from graft.errors import FormatError, PathExists, SignatureError
from graft import _fs
from graft.format.files import SNIFF_BYTES, refuse_code_or_pickle
from graft.format.manifest import (
    MANIFEST_NAME,
    FileEntry,
    FineTuning,
    Manifest,
    Parent,
    TensorEntry,
    canonical_json,
    check_relative_path,
    validate_name,
    validate_version,
)
from graft.export.program import program_to_json
from graft.runtime.program import Program, program_from_json
from graft.runtime.module import FROZEN_BN
from graft.format.spec import ImagePreprocess, SignatureSpec, TensorSpec, TextPreprocess, dtype_name

__all__ = [
    "SavedModule",
    "Signature",
    "model_card_text",
    "save",
    "tensor_sha256",
]

_EXAMPLE_SIZES = {"batch": 2, "seq": 8}



@dataclass(frozen=True)
class Signature:
    """Declares one signature of a module being saved.

    Args:
        method: The model's method to export (``"forward"``, ``"features"``, ...).
        inputs: Input name -> spec (``"float32[batch,3,224,224]"``); named dimensions become
            dynamic. ``None``: inferred from ``example_inputs`` (names from the method's
            parameters, dimension 0 named ``batch``, the rest fixed).
        outputs: Names for the outputs when the method returns a tensor or a tuple; a
            returned dict names its own outputs.
        example_inputs: Tensors to trace with; ``None``: synthesised from ``inputs``.
        preprocess: Declarative preprocessing applied when a caller passes raw data.
        description: One line for people.
    """

    method: str = "forward"
    inputs: Mapping[str, str | TensorSpec] | None = None
    outputs: Sequence[str] | None = None
    example_inputs: tuple[torch.Tensor, ...] | None = None
    preprocess: ImagePreprocess | TextPreprocess | None = None
    description: str = ""


@dataclass(frozen=True)
class SavedModule:
    """Where ``graft.save`` put a module and what it is."""

    name: str
    version: str
    digest: str
    path: Path
    handle: str = field(default="")


def save(
    model: nn.Module,
    destination: str | os.PathLike[str],
    *,
    name: str | None = None,
    version: str | None = None,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
    signatures: Mapping[str, Signature | str] | None = None,
    default_signature: str | None = None,
    description: str = "",
    license: str = "unknown",
    parents: Sequence[Parent | tuple[str, str]] = (),
    trainable: bool = False,
    assets: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
    model_card: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    store: Any = None,
    progress: bool = False,
) -> SavedModule:
    """Export ``model`` as a code-free module.

    ``destination`` is a directory path (``Path``, or a string with a ``/``, ``./``, ``~`` or
    ``file://``) or a store handle ``name@version`` (saved straight into the local store).
    The plain call ``save(model, path, name="tiny", version="1.0.0", example_inputs=(x,))``
    makes ``forward`` the default signature with specs inferred from ``x``.

    Each signature is exported as an ``eval`` and a ``train`` program (plus
    ``train_frozen_bn`` when the model has batch norm) over the same parameter names, checked to reproduce the eager model exactly, and stored with reference
    inputs and outputs. Writing is atomic: an interrupted save leaves no module behind.

    ``progress=True`` shows a progress bar over the signatures being exported.

    Returns:
        The module's name, version, digest and directory.

    Raises:
        FormatError: the model or a signature cannot be exported as declared.
        PathExists: ``destination`` already exists.
        VersionConflict: the store already has a different module under ``name@version``.
    """
    from graft.hub.handles import parse_handle

    handle = parse_handle(destination)
    if handle.kind == "url":
        raise FormatError(f"cannot save to {destination!s}: save to a directory or to the "
                          "local store, then publish with `graft push`")
    if handle.kind == "store":
        if handle.digest:
            raise FormatError(f"cannot save to {destination!s}: a digest is computed, not "
                              "chosen; save to 'name@version'")
        if name is not None and name != handle.name:
            raise FormatError(f"name={name!r} disagrees with the destination "
                              f"{destination!s}; give one of them")
        if version is not None and handle.version is not None and version != handle.version:
            raise FormatError(f"version={version!r} disagrees with the destination "
                              f"{destination!s}; give one of them")
        name, version = handle.name, handle.version or version
    if name is None or version is None:
        raise FormatError("save needs a name and a version: pass name='tiny', "
                          "version='1.0.0', or save to the handle 'tiny@1.0.0'")
    validate_name(name)
    validate_version(version)
    specs = _normalise_signatures(signatures, example_inputs)
    default = default_signature or next(iter(specs))
    if default not in specs:
        raise FormatError(f"default_signature={default!r} is not one of the signatures "
                          f"{sorted(specs)}")
    parent_entries = tuple(p if isinstance(p, Parent) else Parent(*p) for p in parents)
    parent_entries += _embedded_parents(model, {p.digest for p in parent_entries})

    def write(directory: Path) -> Manifest:
        return _write_module(model, directory, name=name, version=version, specs=specs,
                             default=default, description=description, license=license,
                             parents=parent_entries, trainable=trainable, assets=assets or {},
                             model_card=model_card, metadata=metadata or {},
                             progress=progress)

    if handle.kind == "store":
        from graft.hub.store import Store

        store = store or Store()
        with store.staging() as staging:
            manifest = write(staging / "module")
            stored = store.add(staging / "module")
        return SavedModule(name, version, stored.digest, stored.path, f"{name}@{version}")

    target = Path(handle.path).expanduser()
    if target.exists():
        raise PathExists(f"cannot save to {target}: it already exists; modules are immutable, "
                         "choose a new directory (or remove the old one first)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        manifest = write(staging)
        _fs.fsync_tree(staging)
        os.rename(staging, target)
        _fs.fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SavedModule(name, version, manifest.digest, target, str(target))


def _embedded_parents(model: nn.Module, known: set[str]) -> tuple[Parent, ...]:
    """Every hub module inside ``model`` is a parent of what is saved: lineage is automatic."""
    from graft.runtime.module import Module

    found = []
    for sub in model.modules():
        if isinstance(sub, Module) and sub.digest not in known:
            known.add(sub.digest)
            found.append(Parent(f"{sub.name}@{sub.version}", sub.digest))
    return tuple(found)


# -- signatures -------------------------------------------------------------------------------


def _normalise_signatures(signatures: Mapping[str, Signature | str] | None,
                          example_inputs: Any) -> dict[str, Signature]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if signatures is None:
        if example_inputs is None:
            raise FormatError("save needs example_inputs=(x,) to trace forward, or "
                              "signatures={...} with input specs")
        return {"forward": Signature("forward", example_inputs=tuple(example_inputs))}
    if not signatures:
        raise FormatError("signatures is empty; declare at least one")
    out = {}
    for key, sig in signatures.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise FormatError(f"signature name {key!r} must be an identifier")
        sig = Signature(sig) if isinstance(sig, str) else sig
        if sig.example_inputs is None and sig.inputs is None:
            if example_inputs is None:
                raise FormatError(f"signature {key!r} has neither inputs specs nor example "
                                  "inputs; give Signature(inputs={...}) or example_inputs")
            sig = Signature(sig.method, sig.inputs, sig.outputs, tuple(example_inputs),
                            sig.preprocess, sig.description)
        out[key] = sig
    return out


def _input_specs(model: nn.Module, key: str, sig: Signature) -> tuple[dict[str, TensorSpec],
                                                                      tuple[torch.Tensor, ...]]:
    method = getattr(model, sig.method, None)
    if not callable(method):
        raise FormatError(f"signature {key!r} names method {sig.method!r}, which "
                          f"{type(model).__name__} does not have")
    if sig.inputs is not None:
        specs = {k: TensorSpec.of(v) for k, v in sig.inputs.items()}
        examples = sig.example_inputs or tuple(_synthesise(s) for s in specs.values())
        if len(examples) != len(specs):
            raise FormatError(f"signature {key!r} declares {len(specs)} inputs but has "
                              f"{len(examples)} example inputs")
        for (input_name, spec), example in zip(specs.items(), examples):
            try:
                spec.check(input_name, example, {})
            except SignatureError as exc:
                raise FormatError(f"signature {key!r}: the example does not match its own "
                                  f"spec: {exc}") from None
        return specs, tuple(examples)
    examples = tuple(sig.example_inputs or ())
    params = [p for p in inspect.signature(method).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params[: len(examples)]]
    names += [f"input_{i}" for i in range(len(names), len(examples))]
    specs = {}
    for input_name, example in zip(names, examples):
        if not isinstance(example, torch.Tensor):
            raise FormatError(f"example input {input_name!r} of signature {key!r} is a "
                              f"{type(example).__name__}; only tensors can be inputs")
        shape = tuple(["batch", *example.shape[1:]]) if example.dim() else ()
        specs[input_name] = TensorSpec(dtype_name(example.dtype), shape)
    return specs, examples


def _synthesise(spec: TensorSpec) -> torch.Tensor:
    shape = [d if isinstance(d, int) else _EXAMPLE_SIZES.get(d, 3) for d in spec.shape]
    if spec.torch_dtype.is_floating_point:
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(spec.torch_dtype)
    if spec.torch_dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.ones(shape, dtype=spec.torch_dtype)


class _Method(nn.Module):
    """Exposes one method of a model as ``forward``, with its outputs as a flat tuple."""

    def __init__(self, model: nn.Module, method: str, keys: Sequence[str] | None) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.keys = keys

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = getattr(self.model, self.method)(*args)
        if self.keys is not None:
            return tuple(out[k] for k in self.keys)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _output_names(key: str, sig: Signature, out: Any) -> tuple[list[str], list[str] | None]:
    """Output names, and the dict keys to read them by when the method returns a dict."""
    if isinstance(out, Mapping):
        names = [str(k) for k in out]
        return names, list(out)
    count = len(out) if isinstance(out, (tuple, list)) else 1
    if sig.outputs is not None:
        if len(sig.outputs) != count:
            raise FormatError(f"signature {key!r} names {len(sig.outputs)} outputs but "
                              f"{sig.method} returns {count}")
        return list(sig.outputs), None
    return (["output"] if count == 1 else [f"output_{i}" for i in range(count)]), None


# -- writing ----------------------------------------------------------------------------------


@dataclass
class _Exported:
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    programs: dict[str, dict[str, Any]]
    constants: dict[str, dict[str, torch.Tensor]]
    examples: tuple[torch.Tensor, ...]
    reference: list[torch.Tensor]
    dims: dict[str, tuple[int, int | None]]


def _write_module(model: nn.Module, directory: Path, *, name: str, version: str,
                  specs: dict[str, Signature], default: str, description: str, license: str,
                  parents: tuple[Parent, ...], trainable: bool,
                  assets: Mapping[str, Any], model_card: str | None,
                  metadata: Mapping[str, Any], progress: bool) -> Manifest:
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    state, kinds = _state(model)
    steps = tqdm(total=len(specs), desc=f"exporting {name}", unit="signature",
                 disable=not progress, leave=False)
    exported = {}
    with steps:
        for key, sig in specs.items():
            steps.set_postfix_str(key)
            exported[key] = _export_signature(model, key, sig, state)
            steps.update()

    written: dict[str, Path] = {}
    with _fs.writer(directory) as put:
        weights = directory / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
        written["weights.safetensors"] = weights
        signature_specs = {}
        for key, exp in exported.items():
            program_paths: dict[str, str] = {}
            seen: dict[bytes, str] = {}
            for variant, graph in exp.programs.items():
                blob = canonical_json(graph)
                # An eval and a train program that trace to the same graph share one file.
                if blob not in seen:
                    seen[blob] = f"programs/{key}.{variant}.json"
                    written[seen[blob]] = put(seen[blob], blob)
                    if exp.constants[variant]:
                        rel = f"programs/{key}.{variant}.constants.safetensors"
                        save_file({k: v.contiguous() for k, v in exp.constants[variant].items()},
                                  str(directory / rel))
                        written[rel] = directory / rel
                program_paths[variant] = seen[blob]
            ref = {f"input.{k}": v.contiguous() for k, v in zip(exp.inputs, exp.examples)}
            ref.update({f"output.{k}": v.detach().contiguous()
                        for k, v in zip(exp.outputs, exp.reference)})
            rel = f"reference/{key}.safetensors"
            (directory / "reference").mkdir(exist_ok=True)
            save_file(ref, str(directory / rel))
            written[rel] = directory / rel
            preprocess = specs[key].preprocess
            asset_names = [f"assets/{a}" for a in assets]
            if isinstance(preprocess, TextPreprocess) and preprocess.tokenizer not in asset_names:
                raise FormatError(f"signature {key!r} tokenizes with {preprocess.tokenizer!r}, "
                                  f"which is not among the assets {sorted(asset_names)}")
            signature_specs[key] = SignatureSpec(exp.inputs, exp.outputs, program_paths,
                                                 preprocess, specs[key].description, exp.dims)
        for asset_name, content in assets.items():
            rel = check_relative_path(f"assets/{asset_name}")
            data = _asset_bytes(asset_name, content)
            refuse_code_or_pickle(rel, data[:SNIFF_BYTES])
            written[rel] = put(rel, data)

        tensors = {k: TensorEntry(kinds[k], dtype_name(v.dtype), tuple(v.shape), tensor_sha256(v))
                   for k, v in state.items()}
        card = model_card_text(name, version, description, license, signature_specs, default,
                               parents, model_card)
        written["README.md"] = put("README.md", card.encode("utf-8"))
        entries = {rel: FileEntry(_fs.sha256_file(path), path.stat().st_size)
                   for rel, path in sorted(written.items())}
        manifest = Manifest(name=name, version=version, signatures=signature_specs,
                            default_signature=default, files=entries, tensors=tensors,
                            description=description, license=license, parents=parents,
                            fine_tuning=FineTuning(trainable=trainable), metadata=dict(metadata))
        manifest.write(directory)
    return manifest


def _asset_bytes(asset_name: str, content: Any) -> bytes:
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        return content.encode("utf-8")
    if isinstance(content, os.PathLike):
        return Path(content).read_bytes()
    raise FormatError(f"asset {asset_name!r} must be bytes, str or a path, got "
                      f"{type(content).__name__}")


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every parameter and buffer once, by fully-qualified name, detached copies."""
    state: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    for key, param in model.named_parameters():
        state[key], kinds[key] = param.detach().clone(), "parameter"
    for key, buf in model.named_buffers():
        state[key], kinds[key] = buf.detach().clone(), "buffer"
    return state, kinds


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw little-endian bytes in C order."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(memoryview(data.numpy())).hexdigest()


def _export_signature(model: nn.Module, key: str, sig: Signature,
                      state: dict[str, torch.Tensor]) -> _Exported:
    from torch.export import Dim, export

    specs, examples = _input_specs(model, key, sig)
    examples = _widen_examples(specs, examples)
    modes = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()
    try:
        model.eval()
        # Grad mode stays on, as when torch.export traces: some modules (MultiheadAttention)
        # take a different fused kernel under no_grad.
        reference = getattr(model, sig.method)(*examples)
        names, dict_keys = _output_names(key, sig, reference)
        if dict_keys is not None:
            reference = [reference[k] for k in dict_keys]
        elif not isinstance(reference, (tuple, list)):
            reference = [reference]
        reference = [r.detach().clone() for r in reference]
        for out_name, value in zip(names, reference):
            if not isinstance(value, torch.Tensor):
                raise FormatError(f"signature {key!r} output {out_name!r} is a "
                                  f"{type(value).__name__}; outputs must be tensors")
        # Named dims are dynamic; export infers their valid range (e.g. seq <= a position
        # table's length), which is recorded in the signature and checked on every call.
        dynamic = tuple({axis: Dim.DYNAMIC for axis, d in enumerate(spec.shape)
                         if isinstance(d, str)} or None for spec in specs.values())
        wrapper = _Method(model, sig.method, dict_keys)
        programs, constants, outputs = {}, {}, None
        batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        variants = ("eval", "train", FROZEN_BN) if batch_norms else ("eval", "train")
        for variant in variants:
            model.train(variant != "eval")
            if variant == FROZEN_BN:
                # Fine-tuning on small batches: dropout on, batch norm in inference mode
                # (running statistics used, never updated).
                for bn in batch_norms:
                    bn.eval()
            try:
                ep = export(wrapper, examples, dynamic_shapes=(dynamic,), strict=False)
            except Exception as exc:  # torch raises many types; all mean "cannot export"
                raise FormatError(f"signature {key!r} ({sig.method}) cannot be exported in "
                                  f"{variant} mode: {type(exc).__name__}: {exc}"[:2000]) from exc
            programs[variant] = program_to_json(ep, strip_prefix="model.",
                                                input_names=list(specs))
            constants[variant] = {k.removeprefix("model."): v.detach().clone()
                                  for k, v in ep.constants.items()
                                  if isinstance(v, torch.Tensor)}
            if outputs is None:
                outputs = _output_specs(ep, specs, names)
                bounds = _dim_bounds(ep, specs)
    finally:
        for module_name, module in model.named_modules():
            module.training = modes[module_name]
        torch.set_rng_state(rng)
    _check_round_trip(key, programs["eval"], constants["eval"], state, examples, reference)
    return _Exported(specs, outputs, programs, constants, examples, reference, bounds)


def _widen_examples(specs: dict[str, TensorSpec],
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


def _user_input_nodes(ep: Any) -> list[Any]:
    return [n for n in ep.graph.nodes
            if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs]


def _dim_bounds(ep: Any, specs: dict[str, TensorSpec]) -> dict[str, tuple[int, int | None]]:
    """The range export proved each named dimension valid for.

    torch.export assumes sizes >= 2 while tracing (0 and 1 would specialise) but the graph
    it records runs for size 1 too, so a lower bound of 2 is recorded as 1.
    """
    bounds: dict[str, tuple[int, int | None]] = {}
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
            low, high = bounds.get(dim, (1, None))
            low = max(low, lower)
            if upper is not None:
                high = upper if high is None else min(high, upper)
            bounds[dim] = (low, high)
    return {k: v for k, v in bounds.items() if v != (1, None)}


def _finite(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None  # int_oo: unbounded
    return number if abs(number) < 2**31 else None


def _output_specs(ep: Any, specs: dict[str, TensorSpec], names: list[str]) -> dict[str, TensorSpec]:
    import sympy

    symbols: dict[Any, Any] = {}
    for node, spec in zip(_user_input_nodes(ep), specs.values()):
        for size, dim in zip(node.meta["val"].shape, spec.shape):
            if isinstance(size, torch.SymInt) and isinstance(dim, str):
                symbols[size.node.expr] = sympy.Symbol(dim)
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    user_outputs = [v for v, s in zip(out_node.args[0], ep.graph_signature.output_specs)
                    if s.kind.name == "USER_OUTPUT"]
    result = {}
    for out_name, value in zip(names, user_outputs):
        val = value.meta["val"]
        shape: list[int | str] = []
        for size in val.shape:
            if isinstance(size, torch.SymInt):
                expr = size.node.expr.xreplace(symbols)
                shape.append(str(expr).replace(" ", ""))
            else:
                shape.append(int(size))
        result[out_name] = TensorSpec(dtype_name(val.dtype), tuple(shape))
    return result


def _check_round_trip(key: str, graph: dict[str, Any], constants: dict[str, torch.Tensor],
                      state: dict[str, torch.Tensor], examples: tuple[torch.Tensor, ...],
                      reference: list[torch.Tensor]) -> None:
    """The stored eval program must reproduce the eager model (exactly, in practice)."""
    program: Program = program_from_json(graph, name=f"{key}.eval")
    with torch.no_grad():
        got = program({k: v.clone() for k, v in state.items()}, constants, examples)
    for i, (a, b) in enumerate(zip(got, reference)):
        if a.shape != b.shape or not torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5):
            raise FormatError(f"signature {key!r}: the exported program's output {i} differs "
                              "from the eager model's; the method may depend on Python state "
                              "that torch.export cannot capture")


def model_card_text(name: str, version: str, description: str, license: str,
                    signatures: Mapping[str, SignatureSpec], default: str,
                    parents: Sequence[Parent], extra: str | None) -> str:
    """A Markdown model card generated from the manifest, with the author's text after it."""
    lines = [f"# {name} {version}", "", description or "(no description)", "",
             f"License: {license}", "", "## Signatures", "",
             "| signature | inputs | outputs | preprocessing |", "|---|---|---|---|"]
    for key, spec in signatures.items():
        ins = ", ".join(f"`{k}: {v}`" for k, v in spec.inputs.items())
        outs = ", ".join(f"`{k}: {v}`" for k, v in spec.outputs.items())
        pre = spec.preprocess.kind if spec.preprocess else "-"
        mark = " (default)" if key == default else ""
        lines.append(f"| `{key}`{mark} | {ins} | {outs} | {pre} |")
    if parents:
        lines += ["", "## Derived from", ""]
        lines += [f"- `{p.handle}` (`{p.digest}`)" for p in parents]
    lines += ["", "## Use", "", "```python", "import graft",
              f'm = graft.load("{name}@{version}")', "```"]
    if extra:
        lines += ["", extra.strip()]
    return "\n".join(lines) + "\n"

