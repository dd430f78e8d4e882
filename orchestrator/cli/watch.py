"""``watch``: a live view of task and agent events, queue depths and agent load.

It declares no topology of the prefix, so that watching never changes what
it watches (and a prefix nobody served is an error, not a new topology).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from broker import (
    AgentAnnounced,
    AgentHeartbeat,
    AgentLeft,
    AgentsRequest,
    BusSettings,
    Event,
    NoReply,
    QueuesRequest,
    RabbitMQBus,
    StatsRequest,
    TaskFinished,
    TaskProgress,
    TaskStarted,
    TopologyMissing,
    redact_url,
)

from .connection import call, connected, run, stop_on_signals
from .errors import EXIT_UNREACHABLE, CliError
from .escaping import escape_line
from .output import agents_table, cell, out, widen_when_piped
from .redaction import scrub
from .settings import Broker, Prefix, read_settings

if TYPE_CHECKING:
    from rich.console import Group


def watch(
    seconds: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="Stop after this many seconds (default: at Ctrl-C).",
            show_default=False,
        ),
    ] = None,
    refresh: Annotated[
        float, typer.Option(metavar="SECONDS", help="How often load and queues are polled.")
    ] = 1.0,
    broker: Broker = None,
    prefix: Prefix = None,
) -> None:
    """A live view of task and agent events, queue depths and agent load."""
    settings, _ = read_settings(broker, prefix)
    run(_watch(settings, seconds, refresh), ends_by_signal=True)


class WatchView:
    """What ``watch`` shows, rebuilt on each refresh."""

    def __init__(self, settings: BusSettings) -> None:
        self.settings = settings
        self.events: deque[tuple[float, Event]] = deque(maxlen=12)
        self.heartbeats = 0
        self.agents: list[dict[str, Any]] = []
        self.queues: list[dict[str, Any]] = []
        self.stats: dict[str, Any] = {}
        self.note = ""

    async def on_event(self, event: Event) -> None:
        if isinstance(event, AgentHeartbeat):
            self.heartbeats += 1  # the agents table shows their effect
        else:
            self.events.append((time.time(), event))

    def render(self) -> Group:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        title = Text(
            f"prefix {self.settings.prefix} on {redact_url(self.settings.broker_url or '')}",
            style="bold",
        )
        parts: list[Any] = [title]
        if self.stats:
            s = self.stats
            parts.append(
                Text(
                    f"tasks: {s['tasks_created']} created, {s['pending_tasks']} waiting,"
                    f" {s['running_tasks']} running, {s['tasks_completed']} completed,"
                    f" {s['tasks_failed']} failed; utilization {s['overall_utilization']:.0%}"
                )
            )
        if self.note:  # an error: no password at all
            parts.append(Text(escape_line(scrub(self.note)), style="yellow"))
        parts.append(agents_table(self.agents))
        queues = Table("queue", "task type", "capabilities", "waiting", title="task queues")
        for queue in self.queues:
            queues.add_row(
                cell(queue["key"]),
                cell(queue.get("task_type") or "-"),  # older orchestrators route by capabilities
                cell(", ".join(queue["capabilities"]) or "(any)"),
                str(queue["depth"]),
            )
        parts.append(queues)
        events = Table("time", "event", "task / agent", "detail", title="recent events")
        for at, event in self.events:
            subject, detail = _describe(event)
            events.add_row(
                datetime.fromtimestamp(at).strftime("%H:%M:%S"),
                cell(event.kind),
                cell(subject),
                cell(detail),
            )
        parts.append(events)
        return Group(*parts)

    def frame(self) -> Group:
        """``render``, with stdout widened to it when piped (``widen_when_piped``)."""
        frame = self.render()
        widen_when_piped(frame)
        return frame


def _describe(event: Event) -> tuple[str, str]:
    if isinstance(event, TaskStarted):
        return event.task_id, f"on {event.agent_id} (attempt {event.attempt})"
    if isinstance(event, TaskProgress):
        return event.task_id, f"{event.progress:.0%} on {event.agent_id}"
    if isinstance(event, TaskFinished):
        detail = event.outcome + (f": {event.error}" if event.error else "")
        return event.task_id, f"{detail} on {event.agent_id}"
    if isinstance(event, AgentAnnounced):
        caps = ", ".join(event.capabilities) or "any"
        return event.agent_id, f"{caps}; up to {event.max_concurrent_tasks} at once"
    if isinstance(event, AgentLeft):
        return event.agent_id, "left"
    return "", ""


async def _watch(settings: BusSettings, seconds: float | None, refresh: float) -> None:
    view = WatchView(settings)
    # Like the request-only clients it declares no topology: only its own
    # exclusive monitor queue, bound to the events exchange.
    bus = RabbitMQBus(
        settings=settings, connection_name=f"{settings.prefix}:watch", declare_topology=False
    )
    async with connected(bus):
        try:
            await bus.subscribe_events(view.on_event, patterns=["task.#", "agent.#"])
        except TopologyMissing as exc:
            raise CliError(
                f"{exc}: no orchestrator has served prefix {settings.prefix!r} there",
                EXIT_UNREACHABLE,
            ) from None
        stop = stop_on_signals()  # until here a signal just ends it
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds if seconds is not None else None
        from rich.live import Live

        with Live(view.frame(), console=out.console, auto_refresh=False) as live:
            while not stop.is_set():
                try:
                    timeout = max(refresh, 1.0)
                    view.agents = await call(bus, AgentsRequest(), timeout)
                    view.queues = await call(bus, QueuesRequest(), timeout)
                    view.stats = await call(bus, StatsRequest(), timeout)
                    view.note = ""
                except (NoReply, CliError) as exc:
                    view.note = str(exc)
                live.update(view.frame(), refresh=True)
                left = refresh if end is None else min(refresh, end - loop.time())
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), left)
            live.update(view.frame(), refresh=True)
        if not out.is_terminal:
            out.line()  # Live leaves its last frame without a newline when not on a terminal
