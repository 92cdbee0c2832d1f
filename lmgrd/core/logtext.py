"""Text that is safe on one log line: every string a client (or a file) supplied, escaped the same way.

A client chooses its user name, display, client version, product and version strings; a newline in any of
them must not start a forged log line, and a terminal escape must not repaint the operator's screen. One
helper, :func:`printable`, escapes them: the daemon's log formatter (``lmgrd.cli``) runs every formatted
message through it, so no log call can forget, and the usage log applies it to its JSON line (JSON already
escapes C0 controls; this adds the Unicode line breaks JSON leaves alone).

Pure: the standard library only.
"""

from __future__ import annotations

__all__ = ["printable", "printable_json_line"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    named = _NAMED.get(c)
    if named is not None:
        return named
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def printable(text: str) -> str:
    """``text`` with every character that is not printable (C0/C1 controls, DEL, line and paragraph
    separators, format characters) written as a Python-style escape (``\\n``, ``\\x1b``, ``\\u2028``).

    Printable text, Japanese included, comes back unchanged (the same object: one C-level scan).
    Backslashes are kept as they are, so ``CORP\\alice`` stays readable; an escape in the log therefore
    shows what the client sent, never a line it did not write.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


_JSON_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def printable_json_line(line: str) -> str:
    """A JSON text (from ``json.dumps(..., ensure_ascii=False)``) with the line breaks JSON does not escape
    (NEL, U+2028, U+2029) escaped too, so a reader splitting on any line break sees one record per line.
    The JSON still decodes to the same value."""
    if line.isprintable():
        return line
    return line.translate(_JSON_BREAKS)
