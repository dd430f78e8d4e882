"""Text from the bus made safe for a terminal and a log file.

Task names and types, errors, results and agent ids come from other
services and agents: untrusted. Printed raw, a newline in a task type forges
a line of serve's log, and an escape sequence (``ESC [2J``) clears or
rewrites the terminal of whoever runs ``orchestrator status``. So every
such text is shown with its control characters escaped, the way Python
writes them in a string literal (``\\n``, ``\\x1b``, ``\\u2028``): C0 and C1
controls, DEL, the Unicode line and paragraph separators, and the
bidirectional overrides that reorder what a terminal shows. Everything else,
markup-like text and backslashes included, is shown as it is. ``--json``
output needs none of this: JSON escapes control characters itself.
"""

from __future__ import annotations

import re

_OTHERS = "\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069"
"""DEL, C1, the line and paragraph separators, the bidirectional marks and overrides."""
_ANY_UNSAFE = re.compile(f"[\x00-\x1f{_OTHERS}]")
_UNSAFE_BUT_LINES = re.compile(f"[\x00-\x08\x0b-\x1f{_OTHERS}]")
"""Tabs and newlines are a traceback's layout: kept."""
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_line(text: str) -> str:
    """``text`` as one line, every control character escaped (a newline as ``\\n``)."""
    return _ANY_UNSAFE.sub(_escaped, text)


def escape_lines(text: str) -> str:
    """``text`` with its line breaks and tabs kept (a traceback), every other control escaped."""
    return _UNSAFE_BUT_LINES.sub(_escaped, text)
