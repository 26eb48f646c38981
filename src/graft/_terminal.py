"""Text that is safe to print on a terminal.

Module names are validated, but a module's description, license, labels, signature specs and
file names, an index row, or an error message quoting any of them, are bytes from a stranger.
Printed raw, an ANSI escape sequence could recolour or rewrite the screen, a carriage return
or newline could start a line that looks like Graft's own output (another module's digest
line), and a bidirectional override could show text in another order than it is stored.
:func:`printable` makes every such character visible as an escape instead.
"""

from __future__ import annotations

import unicodedata

__all__ = ["printable"]

# Unicode controls that reorder or hide text without being category Cc.
_INVISIBLE = {"\u061c", "\u200e", "\u200f", "\u2028", "\u2029", "\ufeff"} | {
    chr(c) for c in range(0x202A, 0x202F)} | {chr(c) for c in range(0x2066, 0x206A)}


def printable(text: object) -> str:
    """``str(text)`` with every control character escaped (``\\n``, ``\\x1b``, ``\\u202e``).

    Backslashes are escaped too, so an escape in the output always means a control character
    in the data, never a literal backslash sequence forging one.
    """
    value = str(text)
    if value.isprintable() and "\\" not in value and not _INVISIBLE.intersection(value):
        return value
    out = []
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch in _INVISIBLE or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn",
                                                               "Zl", "Zp"):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)
