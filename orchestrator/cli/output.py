"""Where commands print, and the table more than one command shows.

No markup or emoji codes: task names, errors and results are shown as they
are, but for their control characters, which are escaped (``escaping``): what
agents and other services sent must not move the cursor or clear the screen.
``--json`` prints JSON, which escapes them itself.
"""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from .escaping import escape_line, escape_lines
from .redaction import scrub_urls

out = Console(emoji=False, markup=False)
err = Console(stderr=True, emoji=False, markup=False)

UNBOUNDED = 10**9
"""A width no table reaches: what a table is measured against."""


def print_json(data: Any) -> None:
    print(scrub_urls(json.dumps(data, indent=2, default=str)))


def cell(value: Any) -> Text:
    """A table cell of data from the bus: as plain text, without a password in a
    URL, on one line with its control characters escaped."""
    return Text(escape_line(scrub_urls(str(value))))


def block(value: Any) -> Text:
    """Several lines of data from the bus (a traceback): lines and indents kept,
    every other control character escaped."""
    return Text(escape_lines(scrub_urls(str(value))))


def widen_when_piped(renderable: RenderableType) -> None:
    """Piped, make stdout as wide as ``renderable``'s widest line, so that no table
    row wraps or is cut with '…' however long its cells (``main`` makes piped
    output 4096 columns wide, which a long capability list still exceeds).
    On a terminal, nothing: the terminal's width it is."""
    if not out.is_terminal:
        needed = Measurement.get(out, out.options.update_width(UNBOUNDED), renderable).maximum
        out.width = max(out.width, needed)


def print_table(table: Table) -> None:
    """A table on stdout, every row on one line when piped (``widen_when_piped``)."""
    width = out.width
    widen_when_piped(table)
    try:
        out.print(table)
    finally:
        out.width = width


def print_fields(rows: list[tuple[str, Text]]) -> None:
    """``key  value`` lines, the keys aligned, each value whole on its line.

    Not a table: the value is the last column, so a table would pad every
    row to the longest value (a result of kilobytes) and wrap it, piped or
    not; here a long value is one long line, which a terminal wraps itself.
    """
    width = max((len(key) for key, _ in rows), default=0)
    for key, value in rows:
        out.print(Text(f"{key:<{width}}  ").append_text(value), soft_wrap=True)


def agents_table(records: list[dict[str, Any]]) -> Table:
    """The agents and their load, as ``agents`` lists them and ``watch`` shows them."""
    table = Table(
        "agent", "capabilities", "load", "utilization", "performance", "seen", title="agents"
    )
    now = time.time()
    for agent in records:
        seen = agent["last_seen"]
        table.add_row(
            cell(agent["agent_id"]),
            cell(", ".join(agent["capabilities"]) or "-"),
            f"{agent['current_load']}/{agent['max_concurrent_tasks']}",
            f"{agent['utilization']:.0%}",
            f"{agent['performance_score']:.2f}",
            f"{now - seen:.0f}s ago" if seen else "-",
        )
    if not records:
        table.add_row("(none)", "", "", "", "", "")
    return table
