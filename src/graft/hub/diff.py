"""``graft diff A B``: which tensors and files differ between two modules.

Tensors are compared by the sha256 each manifest records (their raw bytes), files by theirs,
so a diff needs no torch and reads no weights: what a fine-tuned child changed is exactly the
tensors whose digests differ from its parent's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from graft.format.manifest import Manifest

__all__ = ["ModuleDiff", "diff_manifests", "diff_modules"]

_SHOWN = 50


@dataclass(frozen=True)
class ModuleDiff:
    """The difference of module B from module A.

    Args:
        a, b: The two manifests.
        tensors_changed: Names in both whose bytes, dtype or shape differ.
        tensors_added: Names only in B.
        tensors_removed: Names only in A.
        tensors_same: How many tensors are identical.
        files_changed, files_added, files_removed: The same for files (by path).
        changed_bytes: Bytes of B's tensors that A does not hold under any name.
    """

    a: Manifest
    b: Manifest
    tensors_changed: tuple[str, ...]
    tensors_added: tuple[str, ...]
    tensors_removed: tuple[str, ...]
    tensors_same: int
    files_changed: tuple[str, ...]
    files_added: tuple[str, ...]
    files_removed: tuple[str, ...]
    changed_bytes: int

    @property
    def identical(self) -> bool:
        return self.a.digest == self.b.digest

    def render(self) -> str:
        """The text ``graft diff`` prints."""
        a, b = self.a, self.b
        lines = [f"--- {a.name}@{a.version} {a.digest}", f"+++ {b.name}@{b.version} {b.digest}"]
        if self.identical:
            return "\n".join([*lines, "identical modules"])
        lines.append(f"tensors: {self.tensors_same} same, {len(self.tensors_changed)} changed, "
                     f"{len(self.tensors_added)} added, {len(self.tensors_removed)} removed "
                     f"({_human(self.changed_bytes)} of tensor bytes new in B)")
        for name in self.tensors_changed[:_SHOWN]:
            ta, tb = a.tensors[name], b.tensors[name]
            lines.append(f"  ~ {name}  {_spec(ta)} -> {_spec(tb)}")
        for name in self.tensors_added[:_SHOWN]:
            lines.append(f"  + {name}  {_spec(b.tensors[name])}")
        for name in self.tensors_removed[:_SHOWN]:
            lines.append(f"  - {name}  {_spec(a.tensors[name])}")
        shown = sum(min(len(x), _SHOWN) for x in (self.tensors_changed, self.tensors_added,
                                                   self.tensors_removed))
        total = len(self.tensors_changed) + len(self.tensors_added) + len(self.tensors_removed)
        if total > shown:
            lines.append(f"  ... and {total - shown} more")
        lines.append(f"files: {len(self.files_changed)} changed, {len(self.files_added)} added, "
                     f"{len(self.files_removed)} removed")
        lines += [f"  ~ {p}" for p in self.files_changed]
        lines += [f"  + {p}" for p in self.files_added]
        lines += [f"  - {p}" for p in self.files_removed]
        fields = [k for k in ("name", "version", "description", "license", "default_signature")
                  if getattr(a, k) != getattr(b, k)]
        if a.parents != b.parents:
            fields.append("parents")
        if {k: v.to_json() for k, v in a.signatures.items()} != \
                {k: v.to_json() for k, v in b.signatures.items()}:
            fields.append("signatures")
        if fields:
            lines.append(f"manifest fields that differ: {', '.join(fields)}")
        return "\n".join(lines)


def diff_manifests(a: Manifest, b: Manifest) -> ModuleDiff:
    """Compare two manifests (no file is read)."""
    changed = tuple(sorted(n for n in set(a.tensors) & set(b.tensors)
                           if a.tensors[n] != b.tensors[n]))
    added = tuple(sorted(set(b.tensors) - set(a.tensors)))
    removed = tuple(sorted(set(a.tensors) - set(b.tensors)))
    same = len(set(a.tensors) & set(b.tensors)) - len(changed)
    held = {t.sha256 for t in a.tensors.values()}
    new_bytes = {t.sha256: _nbytes(t) for t in b.tensors.values() if t.sha256 not in held}
    files_changed = tuple(sorted(p for p in set(a.files) & set(b.files)
                                 if a.files[p] != b.files[p]))
    return ModuleDiff(a=a, b=b, tensors_changed=changed, tensors_added=added,
                      tensors_removed=removed, tensors_same=same, files_changed=files_changed,
                      files_added=tuple(sorted(set(b.files) - set(a.files))),
                      files_removed=tuple(sorted(set(a.files) - set(b.files))),
                      changed_bytes=sum(new_bytes.values()))


def diff_modules(a: Any, b: Any, *, store: Any = None) -> ModuleDiff:
    """Compare two modules named by handles (store, directory or ``oci://``, pulled first)."""
    from graft.hub.oci.push import resolve_module
    from graft.hub.store import Store

    store = store if store is not None else Store()
    return diff_manifests(resolve_module(a, store)[1], resolve_module(b, store)[1])


_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
             "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}


def _nbytes(t: Any) -> int:
    n = _ITEMSIZE.get(t.dtype, 4)
    for d in t.shape:
        n *= d
    return n


def _spec(t: Any) -> str:
    return f"{t.dtype}[{','.join(map(str, t.shape))}] {t.sha256[:12]}"


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
