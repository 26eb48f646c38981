"""Model cards: a module's README.md rendered from Markdown and sanitized.

Two independent layers keep a hostile card inert. markdown-it-py renders CommonMark with raw
HTML turned off (``<script>`` in the source becomes text) and refuses ``javascript:``,
``vbscript:`` and ``data:`` link targets. nh3 (the ammonia sanitizer) then keeps only an
allow-list of tags and attributes and only http, https and mailto URLs, whatever the renderer
produced. The page's Content-Security-Policy forbids inline script besides.
"""

from __future__ import annotations

import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup

__all__ = ["render_card"]

_TAGS = {"a", "abbr", "b", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4",
         "h5", "h6", "hr", "i", "img", "li", "ol", "p", "pre", "s", "strong", "sub", "sup",
         "table", "tbody", "td", "th", "thead", "tr", "ul"}
_ATTRIBUTES = {"a": {"href", "title"}, "img": {"src", "alt", "title"},
               "th": {"align"}, "td": {"align"}, "code": {"class"}}
_SCHEMES = {"http", "https", "mailto"}
_markdown = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table") \
    .enable("strikethrough")


def render_card(source: str) -> Markup:
    """Safe HTML of a Markdown model card (an empty card renders as nothing)."""
    if not source.strip():
        return Markup("")
    html = _markdown.render(source)
    clean = nh3.clean(html, tags=_TAGS, attributes=_ATTRIBUTES, url_schemes=_SCHEMES,
                      link_rel="nofollow noopener noreferrer", strip_comments=True)
    return Markup(clean)  # noqa: S704 - sanitized by nh3 just above
