"""The lineage graph on a module page: parents, the module, children, as inline SVG.

Drawn on the server (no script): three columns of boxes joined by arrows, each box a link to
that module's page when the index knows it. Every label goes through Markup escaping.
"""

from __future__ import annotations

from typing import Any, Sequence

from markupsafe import Markup, escape

__all__ = ["lineage_svg"]

_BOX_W, _BOX_H, _GAP_Y, _COL_GAP, _PAD = 200, 44, 16, 70, 10
_MAX_PER_COLUMN = 12  # more are summarised as "+N more"


def _label(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _box(x: int, y: int, title: str, subtitle: str, href: str | None, kind: str) -> str:
    body = (f'<rect x="{x}" y="{y}" width="{_BOX_W}" height="{_BOX_H}" rx="8" '
            f'class="node {kind}"/>'
            f'<text x="{x + 12}" y="{y + 19}" class="title">{escape(_label(title))}</text>'
            f'<text x="{x + 12}" y="{y + 35}" class="sub">{escape(_label(subtitle, 32))}</text>')
    if href:
        return f'<a href="{escape(href)}"><title>{escape(title)}</title>{body}</a>'
    return f"<g><title>{escape(title)}</title>{body}</g>"


def _column(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if len(items) <= _MAX_PER_COLUMN:
        return list(items)
    rest = len(items) - (_MAX_PER_COLUMN - 1)
    return [*items[: _MAX_PER_COLUMN - 1], {"title": f"+{rest} more", "subtitle": "",
                                            "href": None}]


def lineage_svg(current: dict[str, Any], parents: Sequence[dict[str, Any]],
                children: Sequence[dict[str, Any]]) -> Markup:
    """The graph as an ``<svg>`` element.

    Args:
        current: ``{"title", "subtitle"}`` of the module shown.
        parents, children: ``{"title", "subtitle", "href"}`` each (``href`` may be None).
    """
    left, right = _column(parents), _column(children)
    rows = max(len(left), len(right), 1)
    height = _PAD * 2 + rows * _BOX_H + (rows - 1) * _GAP_Y
    width = _PAD * 2 + 3 * _BOX_W + 2 * _COL_GAP
    xs = [_PAD, _PAD + _BOX_W + _COL_GAP, _PAD + 2 * (_BOX_W + _COL_GAP)]

    def ys(n: int) -> list[int]:
        block = n * _BOX_H + (n - 1) * _GAP_Y
        top = (height - block) // 2
        return [top + i * (_BOX_H + _GAP_Y) for i in range(n)]

    mid_y = ys(1)[0]
    parts = []
    for y in ys(len(left)):
        parts.append(f'<line x1="{xs[0] + _BOX_W}" y1="{y + _BOX_H // 2}" x2="{xs[1]}" '
                     f'y2="{mid_y + _BOX_H // 2}" class="edge" marker-end="url(#arrow)"/>')
    for y in ys(len(right)):
        parts.append(f'<line x1="{xs[1] + _BOX_W}" y1="{mid_y + _BOX_H // 2}" x2="{xs[2]}" '
                     f'y2="{y + _BOX_H // 2}" class="edge" marker-end="url(#arrow)"/>')
    for item, y in zip(left, ys(len(left))):
        parts.append(_box(xs[0], y, item["title"], item["subtitle"], item.get("href"), "parent"))
    parts.append(_box(xs[1], mid_y, current["title"], current["subtitle"], None, "current"))
    for item, y in zip(right, ys(len(right))):
        parts.append(_box(xs[2], y, item["title"], item["subtitle"], item.get("href"), "child"))
    if not left:
        parts.append(f'<text x="{xs[0] + 12}" y="{mid_y + 27}" class="none">no parents</text>')
    if not right:
        parts.append(f'<text x="{xs[2] + 12}" y="{mid_y + 27}" class="none">no children</text>')
    svg = (f'<svg class="lineage" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="lineage graph" xmlns="http://www.w3.org/2000/svg">'
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
           'markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" '
           'class="arrowhead"/></marker></defs>' + "".join(parts) + "</svg>")
    return Markup(svg)  # noqa: S704 - every label above is escaped
