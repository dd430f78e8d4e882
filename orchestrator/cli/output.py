"""Where commands print, and the table more than one command shows.

No markup or emoji codes: task names, errors and results are shown as they
are, but for their control characters, which are escaped (``escaping``): what
agents and other services sent must not move the cursor or clear the screen.
``--json`` prints JSON, which escapes them itself.

rich is imported when something is first printed through ``out`` or ``err``
(or a table is made), not with the command line: its import is a good part
of the start-up CPU of a command that prints no table (``--help``,
``topology``), and the test suite starts the command line hundreds of times.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from .escaping import escape_line, escape_lines
from .redaction import scrub_urls

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.table import Table
    from rich.text import Text


class LazyConsole:
    """A rich ``Console`` made on first use, with ``options``; every attribute is
    the console's. ``console`` is the console itself, for what rich is given
    (``Progress``, ``Live``, ``Measurement``)."""

    def __init__(self, **options: Any) -> None:
        object.__setattr__(self, "_options", options)
        object.__setattr__(self, "_console", None)
        object.__setattr__(self, "_min_piped_width", 0)

    @property
    def console(self) -> Console:
        made: Console | None = object.__getattribute__(self, "_console")
        if made is None:
            from rich.console import Console

            made = Console(**object.__getattribute__(self, "_options"))
            if not made.is_terminal:
                made.width = max(made.width, object.__getattribute__(self, "_min_piped_width"))
            object.__setattr__(self, "_console", made)
        return made

    def at_least_when_piped(self, width: int) -> None:
        """Make the console at least ``width`` columns wide when it is not a
        terminal, now if it is made, else as it is made."""
        object.__setattr__(self, "_min_piped_width", width)
        made: Console | None = object.__getattribute__(self, "_console")
        if made is not None and not made.is_terminal:
            made.width = max(made.width, width)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.console, name, value)


out = LazyConsole(emoji=False, markup=False)
err = LazyConsole(stderr=True, emoji=False, markup=False)

UNBOUNDED = 10**9
"""A width no table reaches: what a table is measured against."""


def print_json(data: Any) -> None:
    print(scrub_urls(json.dumps(data, indent=2, default=str)))


def cell(value: Any) -> Text:
    """A table cell of data from the bus: as plain text, without a password in a
    URL, on one line with its control characters escaped."""
    from rich.text import Text

    return Text(escape_line(scrub_urls(str(value))))


def block(value: Any) -> Text:
    """Several lines of data from the bus (a traceback): lines and indents kept,
    every other control character escaped."""
    from rich.text import Text

    return Text(escape_lines(scrub_urls(str(value))))


def widen_when_piped(renderable: RenderableType) -> None:
    """Piped, make stdout as wide as ``renderable``'s widest line, so that no table
    row wraps or is cut with '…' however long its cells (``main`` makes piped
    output 4096 columns wide, which a long capability list still exceeds).
    On a terminal, nothing: the terminal's width it is."""
    from rich.measure import Measurement

    if not out.is_terminal:
        console = out.console
        measured = Measurement.get(console, console.options.update_width(UNBOUNDED), renderable)
        out.width = max(out.width, measured.maximum)


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
    from rich.text import Text

    width = max((len(key) for key, _ in rows), default=0)
    for key, value in rows:
        out.print(Text(f"{key:<{width}}  ").append_text(value), soft_wrap=True)


def agents_table(records: list[dict[str, Any]]) -> Table:
    """The agents and their load, as ``agents`` lists them and ``watch`` shows them."""
    from rich.table import Table

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
