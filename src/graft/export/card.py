"""The model card (``README.md``) that ``graft.save`` writes from the manifest."""

from __future__ import annotations

from typing import Mapping, Sequence

from graft.format.entries import Parent
from graft.format.spec import SignatureSpec

__all__ = ["model_card_text"]


def model_card_text(name: str, version: str, description: str, license: str,
                    signatures: Mapping[str, SignatureSpec], default: str,
                    parents: Sequence[Parent], extra: str | None,
                    eval_only: str = "") -> str:
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
    if eval_only:
        lines += ["", "## Fine-tuning", "", f"This module is eval-only: {eval_only}"]
    if parents:
        lines += ["", "## Derived from", ""]
        lines += [f"- `{p.handle}` (`{p.digest}`)" for p in parents]
    lines += ["", "## Use", "", "```python", "import graft",
              f'm = graft.load("{name}@{version}")', "```"]
    if extra:
        lines += ["", extra.strip()]
    return "\n".join(lines) + "\n"
