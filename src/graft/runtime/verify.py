"""``graft verify``: every byte, every tensor, and the reference outputs of every signature."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from graft.errors import IntegrityError
from graft.format.validate import check_module
from graft.runtime.load import load, read_safetensors
from graft.format.manifest import Manifest, resolve_inside

__all__ = ["VerifyReport", "verify_module"]


@dataclass
class VerifyReport:
    """What ``verify_module`` checked."""

    files: int = 0
    tensors: int = 0
    signatures: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0


def verify_module(directory: Path, *, atol: float = 1e-5, rtol: float = 1e-4) -> VerifyReport:
    """Check a module directory completely.

    Hashes every file and every tensor against the manifest, then runs each signature's eval
    program on its stored reference inputs and compares with the reference outputs (the
    tolerance allows for another machine's floating-point kernels).

    Raises:
        IntegrityError: a file, tensor or reference output does not match.
    """
    from graft.export.save import tensor_sha256

    directory = Path(directory)
    manifest = Manifest.read(directory)
    check_module(directory, manifest, hash_contents=True)
    report = VerifyReport(files=len(manifest.files))
    weights = read_safetensors(resolve_inside(directory.resolve(), "weights.safetensors"))
    for key, entry in manifest.tensors.items():
        if key not in weights or tensor_sha256(weights[key]) != entry.sha256:
            raise IntegrityError(f"tensor {key} does not match its sha256 in the manifest")
        report.tensors += 1
    module = load(directory, trainable=False)
    for name in manifest.signatures:
        rel = f"reference/{name}.safetensors"
        if rel not in manifest.files:
            continue
        ref = read_safetensors(resolve_inside(directory.resolve(), rel))
        inputs = {k.removeprefix("input."): v for k, v in ref.items() if k.startswith("input.")}
        with torch.no_grad():
            out = module.call(name, **inputs)
        outs = out if isinstance(out, dict) else {next(iter(manifest.signatures[name].outputs)): out}
        for out_name, value in outs.items():
            expected = ref[f"output.{out_name}"]
            diff = (value.double() - expected.double()).abs()
            worst = float(diff.max()) if diff.numel() else 0.0
            report.max_abs_diff = max(report.max_abs_diff, worst)
            if not torch.allclose(value.double(), expected.double(), atol=atol, rtol=rtol):
                raise IntegrityError(f"signature {name!r} output {out_name!r} differs from its "
                                     f"reference by up to {worst:.3g}")
        report.signatures.append(name)
    return report
