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

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .escaping import escape_line, escape_lines
from .redaction import scrub_urls

out = Console(emoji=False, markup=False)
err = Console(stderr=True, emoji=False, markup=False)


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
