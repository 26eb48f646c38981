"""``graft.save``: turn an ``nn.Module`` into a code-free module on disk or in the store.

The pieces: ``signature.py`` names and types the inputs, ``trace.py`` drives torch.export for
each program variant, ``outputs.py`` flattens what the model returns, ``fidelity.py`` checks
every program against the eager model, ``state.py`` collects the weights (tied ones once).
This file decides what to save and writes it atomically.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from graft import _fs
from graft._testing import stop_point
from graft.errors import FormatError, PathExists, SaveWarning
from graft.export.card import model_card_text
from graft.export.signature import Signature, bind_inputs, normalise_signatures
from graft.export.state import ModelState, model_state, tensor_sha256
from graft.export.trace import Traced, trace_signature
from graft.format.entries import FileEntry, FineTuning, Parent, TensorEntry
from graft.format.files import refuse_code_or_pickle
from graft.format.manifest import (
    Manifest,
    canonical_json,
    check_relative_path,
    validate_name,
    validate_version,
)
from graft.format.spec import SignatureSpec, TensorSpec, TextPreprocess, dtype_name
from graft.runtime.module import FROZEN_BN

__all__ = [
    "SavedModule",
    "Signature",
    "VARIANTS",
    "model_card_text",
    "save",
    "tensor_sha256",
]

#: The program variants a signature can have, in the order they are exported.
VARIANTS = ("eval", "train", FROZEN_BN)


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
    example_kwargs: Mapping[str, Any] | None = None,
    inputs: Mapping[str, str | TensorSpec] | None = None,
    signatures: Mapping[str, Signature | str] | None = None,
    default_signature: str | None = None,
    variants: Sequence[str] | None = None,
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
    The plain call is the model's own call, split into positional and keyword examples::

        graft.save(model, path, name="tiny-lm", version="1.0.0", example_inputs=(ids,),
                   example_kwargs={"attention_mask": mask},
                   inputs={"input_ids": "int64[batch,seq]",
                           "attention_mask": "int64[batch,seq]"})

    makes ``forward`` the default signature, with inputs named after the arguments and specs
    inferred from the examples (``inputs`` overrides some or all of them; named dimensions
    are dynamic). Whatever the model returns (a tensor, tuples, dicts, a ``ModelOutput``) is
    flattened into named outputs, and the loaded module returns the same structure.
    Parameters and buffers registered under several names (tied weights) are stored once
    and stay tied after loading.

    Each signature is exported as an ``eval`` and a ``train`` program (plus
    ``train_frozen_bn`` when the model has batch norm) over the same parameter names. Every
    program is run before it is stored and must reproduce the eager model exactly: eval
    outputs; train outputs, gradients and batch-norm updates under the same seed. If the
    train mode cannot be exported (a model that draws random masks with NumPy in training)
    the module is saved eval-only with a ``SaveWarning``; ``variants=("eval",)`` asks for
    that. A dimension the model's code limits (a position table, ``if x.shape[0] > 4``) is
    recorded, enforced on every call and reported with a ``SaveWarning``. Writing is atomic:
    an interrupted save leaves no module behind.

    Args:
        variants: The program variants to store; ``None``: all that apply, train ones only
            if they export. Named variants must all export.
        progress: Show a progress bar over the signatures being exported.

    Returns:
        The module's name, version, digest and directory.

    Raises:
        FormatError: the model or a signature cannot be exported as declared (a branch on
            tensor values is named by its line), or a program differs from the eager model.
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
    wanted, train_required = _variants(variants, trainable)
    if inputs is not None and signatures is not None:
        raise FormatError("inputs= describes the default forward signature; with "
                          "signatures={...}, give each Signature(inputs=...)")
    specs = normalise_signatures(signatures, example_inputs, example_kwargs, inputs)
    default = default_signature or next(iter(specs))
    if default not in specs:
        raise FormatError(f"default_signature={default!r} is not one of the signatures "
                          f"{sorted(specs)}")
    parent_entries = tuple(p if isinstance(p, Parent) else Parent(*p) for p in parents)
    parent_entries += _embedded_parents(model, {p.digest for p in parent_entries})

    state = model_state(model)
    traced = _trace_all(model, name, specs, state, wanted, train_required, progress)
    eval_only = next((t.eval_only for t in traced.values() if t.eval_only), "")
    if "train" not in wanted:
        eval_only = "it was saved with variants=('eval',)"
    elif eval_only:
        if trainable:
            raise FormatError(f"trainable=True, but {eval_only}; save with trainable=False "
                              "to get an eval-only module")
        warnings.warn(f"graft.save: {name}@{version} is saved eval-only (it cannot be "
                      f"fine-tuned): {eval_only}. Pass variants=('eval',) to ask for this "
                      "without a warning", SaveWarning, stacklevel=2)
    for one in traced.values():  # eval-only is a property of the whole module
        if eval_only:
            one.programs = {"eval": one.programs["eval"]}
            one.constants = {"eval": one.constants["eval"]}

    def write(directory: Path) -> Manifest:
        return _write_module(directory, name=name, version=version, specs=specs,
                             traced=traced, state=state, default=default,
                             description=description, license=license,
                             parents=parent_entries,
                             fine_tuning=FineTuning(trainable=trainable, eval_only=eval_only,
                                                    frozen=_frozen(state)),
                             assets=assets or {}, model_card=model_card,
                             metadata=metadata or {})

    if handle.kind == "store":
        from graft.hub.store import Store

        store = store or Store()
        with store.staging() as staging:
            write(staging / "module")
            stop_point("save.written")
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
        stop_point("save.written")
        os.rename(staging, target)
        _fs.fsync_dir(target.parent)
        stop_point("save.renamed")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SavedModule(name, version, manifest.digest, target, str(target))


def _frozen(state: ModelState) -> tuple[str, ...]:
    """Parameters the source model does not train stay untrained in the module."""
    return tuple(k for k, kind in state.kinds.items()
                 if kind == "parameter" and k not in state.requires_grad)


def _variants(variants: Sequence[str] | None, trainable: bool) -> tuple[tuple[str, ...], bool]:
    """The variants to export, and whether the train ones must succeed."""
    if variants is None:
        return VARIANTS, False
    if isinstance(variants, str) or not all(isinstance(v, str) for v in variants):
        raise FormatError(f"variants must be a tuple of names such as ('eval',), got "
                          f"{variants!r}")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "eval" not in variants:
        raise FormatError(f"variants={tuple(variants)!r}: expected 'eval' and any of "
                          f"{VARIANTS[1:]}; unknown {unknown}")
    if FROZEN_BN in variants and "train" not in variants:
        raise FormatError(f"variants={tuple(variants)!r}: {FROZEN_BN!r} needs 'train' too")
    if trainable and "train" not in variants:
        raise FormatError("trainable=True needs a train program; drop variants=('eval',) "
                          "or save with trainable=False")
    return tuple(v for v in VARIANTS if v in variants), True


def _trace_all(model: nn.Module, name: str, specs: Mapping[str, Signature],
               state: ModelState, variants: tuple[str, ...], train_required: bool,
               progress: bool) -> dict[str, Traced]:
    steps = tqdm(total=len(specs), desc=f"exporting {name}", unit="signature",
                 disable=not progress, leave=False)
    traced: dict[str, Traced] = {}
    with steps:
        for key, sig in specs.items():
            steps.set_postfix_str(key)
            bound = bind_inputs(model, key, sig)
            traced[key] = trace_signature(model, key, sig, bound, state, variants,
                                          train_required)
            if traced[key].eval_only:
                # One signature that cannot train makes the module eval-only: stop tracing
                # train programs for the rest.
                variants, train_required = ("eval",), True
            steps.update()
    return traced


def _embedded_parents(model: nn.Module, known: set[str]) -> tuple[Parent, ...]:
    """Every hub module inside ``model`` is a parent of what is saved: lineage is automatic."""
    from graft.runtime.module import Module

    found = []
    for sub in model.modules():
        if isinstance(sub, Module) and sub.digest not in known:
            known.add(sub.digest)
            found.append(Parent(f"{sub.name}@{sub.version}", sub.digest))
    return tuple(found)


def _write_module(directory: Path, *, name: str, version: str, specs: dict[str, Signature],
                  traced: dict[str, Traced], state: ModelState, default: str,
                  description: str, license: str, parents: tuple[Parent, ...],
                  fine_tuning: FineTuning, assets: Mapping[str, Any], model_card: str | None,
                  metadata: Mapping[str, Any]) -> Manifest:
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    written: dict[str, Path] = {}
    asset_names = [f"assets/{a}" for a in assets]
    with _fs.writer(directory) as put:
        weights = directory / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in state.tensors.items()}, str(weights))
        written["weights.safetensors"] = weights
        signature_specs = {}
        for key, exp in traced.items():
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
            bound = exp.inputs
            ref = {f"input.{k}": v.contiguous() for k, v in zip(bound.specs, bound.examples)}
            ref.update({f"output.{k}": v.contiguous()
                        for k, v in zip(exp.outputs, exp.reference)})
            rel = f"reference/{key}.safetensors"
            (directory / "reference").mkdir(exist_ok=True)
            save_file(ref, str(directory / rel))
            written[rel] = directory / rel
            preprocess = specs[key].preprocess
            if isinstance(preprocess, TextPreprocess) and preprocess.tokenizer not in asset_names:
                raise FormatError(f"signature {key!r} tokenizes with {preprocess.tokenizer!r}, "
                                  f"which is not among the assets {sorted(asset_names)}")
            signature_specs[key] = SignatureSpec(bound.specs, exp.outputs, program_paths,
                                                 preprocess, specs[key].description, exp.dims,
                                                 exp.structure)
        for asset_name, content in assets.items():
            rel = check_relative_path(f"assets/{asset_name}")
            data = _asset_bytes(asset_name, content)
            refuse_code_or_pickle(rel, data)  # all of it: a payload may lie past any prefix
            written[rel] = put(rel, data)

        tensors = {k: TensorEntry(state.kinds[k], dtype_name(v.dtype), tuple(v.shape),
                                  tensor_sha256(v))
                   for k, v in state.tensors.items()}
        card = model_card_text(name, version, description, license, signature_specs, default,
                               parents, model_card, fine_tuning.eval_only)
        written["README.md"] = put("README.md", card.encode("utf-8"))
        entries = {rel: FileEntry(_fs.sha256_file(path), path.stat().st_size)
                   for rel, path in sorted(written.items())}
        manifest = Manifest(name=name, version=version, signatures=signature_specs,
                            default_signature=default, files=entries, tensors=tensors,
                            description=description, license=license, parents=parents,
                            fine_tuning=fine_tuning, metadata=dict(metadata),
                            aliases=dict(state.aliases))
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
