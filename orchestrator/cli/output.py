"""Where commands print, and the table more than one command shows.

No markup or emoji codes: task names, errors and results are shown as they are.
"""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from .redaction import scrub_urls

out = Console(emoji=False, markup=False)
err = Console(stderr=True, emoji=False, markup=False)


def print_json(data: Any) -> None:
    print(scrub_urls(json.dumps(data, indent=2, default=str)))


def agents_table(records: list[dict[str, Any]]) -> Table:
    """The agents and their load, as ``agents`` lists them and ``watch`` shows them."""
    table = Table(
        "agent", "capabilities", "load", "utilization", "performance", "seen", title="agents"
    )
    now = time.time()
    for agent in records:
        seen = agent["last_seen"]
        table.add_row(
            agent["agent_id"],
            ", ".join(agent["capabilities"]) or "-",
            f"{agent['current_load']}/{agent['max_concurrent_tasks']}",
            f"{agent['utilization']:.0%}",
            f"{agent['performance_score']:.2f}",
            f"{now - seen:.0f}s ago" if seen else "-",
        )
    if not records:
        table.add_row("(none)", "", "", "", "", "")
    return table
