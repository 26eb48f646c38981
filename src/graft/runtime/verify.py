"""``graft verify``: every byte, every tensor, and the reference outputs of every signature.

A module passes only if everything it claims holds: each file and tensor matches its
sha256, every signature declares outputs and its program returns exactly those, and each
reference file ``reference/<signature>.safetensors`` holds exactly the signature's inputs
(``input.<name>``) and outputs (``output.<name>``), with the declared dtypes and shapes,
and the outputs reproduce.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graft.errors import FormatError, GraftError, IntegrityError, SignatureError
from graft.format.manifest import Manifest, resolve_inside
from graft.format.spec import SignatureSpec, dtype_name_or_str
from graft.format.tensorfile import read_safetensors_header
from graft.format.validate import check_module
from graft.runtime.load import load, read_safetensors

__all__ = ["VerifyReport", "verify_module"]

_CHUNK = 1 << 20


@dataclass
class VerifyReport:
    """What ``verify_module`` checked.

    Args:
        files: Files whose sha256 matched.
        tensors: Tensors whose sha256 matched.
        signatures: Signatures whose reference outputs reproduced.
        max_abs_diff: The largest difference from a reference output.
        unchecked: Signatures without a reference file (nothing to compare against).
    """

    files: int = 0
    tensors: int = 0
    signatures: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0
    unchecked: list[str] = field(default_factory=list)


def verify_module(directory: Path, *, atol: float = 1e-5, rtol: float = 1e-4) -> VerifyReport:
    """Check a module directory completely.

    Hashes every file and every tensor against the manifest, then runs each signature's eval
    program on its stored reference inputs and compares with the reference outputs (the
    tolerance allows for another machine's floating-point kernels).

    Raises:
        IntegrityError: a file or tensor does not match its sha256, or an output does not
            reproduce.
        FormatError: a signature declares no outputs, a program returns other outputs than
            its signature declares, or a reference file does not match its signature.
    """
    directory = Path(directory)
    manifest = Manifest.read(directory)
    check_module(directory, manifest, hash_contents=True)
    for name, spec in manifest.signatures.items():
        if not spec.outputs:
            raise FormatError(f"signature {name!r} declares no outputs; a signature must "
                              "return at least one tensor (re-save the module)")
    for rel in manifest.files:
        if rel.startswith("reference/") and rel.endswith(".safetensors"):
            if rel.removeprefix("reference/").removesuffix(".safetensors") \
                    not in manifest.signatures:
                raise FormatError(f"{rel} is the reference of no signature; the module has "
                                  f"{sorted(manifest.signatures)}")
    root = directory.resolve()
    report = VerifyReport(files=len(manifest.files),
                          tensors=_check_tensors(root, manifest))
    module = load(directory, trainable=False)
    for name, spec in manifest.signatures.items():
        rel = f"reference/{name}.safetensors"
        if rel not in manifest.files:
            report.unchecked.append(name)
            continue
        inputs, expected = _reference(rel, read_safetensors(resolve_inside(root, rel)), spec)
        try:
            with torch.no_grad():
                outputs = module.call_outputs(name, **inputs)
        except ValueError as exc:  # the program's outputs do not zip with the signature's
            if isinstance(exc, GraftError):
                raise
            raise FormatError(f"signature {name!r}: its program does not return the "
                              f"{len(spec.outputs)} outputs it declares ({exc})") from None
        if sorted(outputs) != sorted(spec.outputs):
            raise FormatError(f"signature {name!r} returned outputs {sorted(outputs)} but "
                              f"declares {sorted(spec.outputs)}")
        for out_name, value in outputs.items():
            want = expected[out_name]
            if tuple(value.shape) != tuple(want.shape) or value.dtype != want.dtype:
                raise IntegrityError(f"signature {name!r} output {out_name!r} is "
                                     f"{_spec_of(value)} but its reference is {_spec_of(want)}")
            diff = (value.double() - want.double()).abs()
            worst = float(diff.max()) if diff.numel() else 0.0
            report.max_abs_diff = max(report.max_abs_diff, worst)
            if not torch.allclose(value.double(), want.double(), atol=atol, rtol=rtol,
                                  equal_nan=True):
                raise IntegrityError(f"signature {name!r} output {out_name!r} differs from its "
                                     f"reference by up to {worst:.3g}")
        report.signatures.append(name)
    return report


def _check_tensors(root: Path, manifest: Manifest) -> int:
    """Hash each tensor's bytes in ``weights.safetensors`` (the little-endian C-order bytes
    the manifest records), straight from the file; return how many matched."""
    path = resolve_inside(root, "weights.safetensors")
    header = read_safetensors_header(path, what="weights.safetensors")
    missing = sorted(set(manifest.tensors) - set(header.tensors))
    if missing:
        raise IntegrityError(f"weights.safetensors lacks tensors the manifest lists: "
                             f"{missing[:5]}")
    with open(path, "rb") as f:
        for key, entry in manifest.tensors.items():
            info = header.tensors[key]
            f.seek(header.data_start + info.begin)
            digest, left = hashlib.sha256(), info.end - info.begin
            while left > 0 and (chunk := f.read(min(left, _CHUNK))):
                digest.update(chunk)
                left -= len(chunk)
            if digest.hexdigest() != entry.sha256:
                raise IntegrityError(f"tensor {key} does not match its sha256 in the manifest")
    return len(manifest.tensors)


def _reference(rel: str, ref: dict[str, torch.Tensor],
               spec: SignatureSpec) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a reference file into inputs and outputs, refusing one that does not hold
    exactly the signature's inputs and outputs with their declared specs."""
    inputs = {k.removeprefix("input."): v for k, v in ref.items() if k.startswith("input.")}
    outputs = {k.removeprefix("output."): v for k, v in ref.items() if k.startswith("output.")}
    stray = sorted(k for k in ref if not k.startswith(("input.", "output.")))
    for what, found, declared in (("inputs", inputs, spec.inputs),
                                  ("outputs", outputs, spec.outputs)):
        if stray or set(found) != set(declared):
            raise FormatError(f"{rel} holds {what} {sorted(found)}"
                              + (f" and unknown entries {stray[:5]}" if stray else "")
                              + f", but the signature declares {what} {sorted(declared)} "
                              "(entries named input.<name> and output.<name>)")
    sizes: dict[str, int] = {}
    for what, found, declared in (("input", inputs, spec.inputs),
                                  ("output", outputs, spec.outputs)):
        for key, tensor_spec in declared.items():
            try:
                tensor_spec.check(key, found[key], sizes)
            except SignatureError as exc:
                raise FormatError(f"{rel}: reference {what} {key!r} does not match the "
                                  f"signature: {exc}") from None
    return inputs, outputs


def _spec_of(tensor: torch.Tensor) -> str:
    return f"{dtype_name_or_str(tensor.dtype)}[{','.join(map(str, tensor.shape))}]"

