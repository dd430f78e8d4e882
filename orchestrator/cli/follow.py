"""``submit --wait``: following a submitted task to its end.

It polls the task's status and draws its progress on stderr; while no agent
holds the task it also asks, less often, whether any registered agent can run
it, so that a task no agent can take is said to wait for one rather than
seeming stuck. Apart from ``submit``, which builds and sends the request,
because this is what happens after: what is watched, what is said, and which
exit code the end gives (completed, ended otherwise, or still going when
``--wait-timeout`` ran out).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from broker import AgentsRequest, RabbitMQBus, SubmitTaskRequest, TaskStatusRequest

from ..models import TaskStatus
from .connection import call
from .errors import EXIT_OK, EXIT_TASK_DID_NOT_COMPLETE, EXIT_WAIT_TIMED_OUT
from .escaping import escape_line
from .output import err, print_json
from .redaction import scrub, scrub_urls

POLL_SECONDS = 0.2
"""How often ``submit --wait`` asks for the task's status."""
AGENTS_POLL_SECONDS = 1.0
"""How often ``submit --wait`` asks, while the task waits, whether an agent can run it."""


class Follow:
    """How ``submit --wait`` follows its task: how long at most, what it has said."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.status: dict[str, Any] | None = None
        """The task's last status seen."""
        self.no_agent: str | None = None
        """Why no registered agent can run the task, while that is so."""


def ended(task_id: str, status: dict[str, Any], as_json: bool) -> int:
    """The followed task ended: print how, and exit 0 only if it completed."""
    if as_json:
        print_json(status)
    else:
        took = ""
        if status["started_at"]:
            took = f" after {time.time() - status['started_at']:.2f}s"
        outcome = json.dumps(status["result"]) if status["result"] else status["error_message"]
        agent = status["assigned_agent"] or "no agent"
        print(escape_line(scrub_urls(f"{status['status']}{took} on {agent}: {outcome}")))
    if status["status"] != TaskStatus.COMPLETED.value:
        _error(f"error: task {task_id} ended {status['status']}: {status['error_message']}")
        return EXIT_TASK_DID_NOT_COMPLETE
    return EXIT_OK


def _error(line: str) -> None:
    err.print(escape_line(scrub(line)), markup=False, highlight=False, soft_wrap=True)


def gave_up(task_id: str, follow: Follow, as_json: bool) -> int:
    """``--wait-timeout`` ran out: say where the task is, and that it goes on."""
    state = follow.status["status"] if follow.status else "unknown"
    if as_json and follow.status is not None:
        print_json(follow.status)
    why = f", waiting for a capable agent ({follow.no_agent})" if follow.no_agent else ""
    _error(
        f"error: task {task_id} had not ended within --wait-timeout {follow.timeout:g}s:"
        f" it is {state}{why}; it was not cancelled"
    )
    return EXIT_WAIT_TIMED_OUT


async def follow_task(
    bus: RabbitMQBus,
    task_id: str,
    request: SubmitTaskRequest,
    request_timeout: float,
    follow: Follow,
) -> dict[str, Any]:
    """Poll the task's status until it ends, drawing its progress on stderr, and
    saying (once each time it becomes so) when no registered agent can run it."""
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    loop = asyncio.get_running_loop()
    next_agents_check = loop.time()
    name = request.name
    with Progress(*columns, console=err.console) as progress:

        def note(text: str) -> None:  # above the bar, as it is (no markup)
            progress.console.print(escape_line(text), markup=False, highlight=False, soft_wrap=True)

        name = escape_line(name)
        bar = progress.add_task(escape(name), total=1.0)
        while True:
            status = await call(bus, TaskStatusRequest(task_id=task_id), request_timeout)
            follow.status = status
            description = escape(f"{name} [{status['status']}]")
            progress.update(bar, completed=status["progress"], description=description)
            if follow.no_agent and status["assigned_agent"]:  # one took it after all
                note(f"{status['assigned_agent']} can run it")
                follow.no_agent = None
            if TaskStatus(status["status"]).is_final:
                return status
            if status["assigned_agent"] is None and loop.time() >= next_agents_check:
                agents = await call(bus, AgentsRequest(), request_timeout)
                no_agent = no_capable_agent(agents, request)
                if no_agent and no_agent != follow.no_agent:
                    note(f"waiting for a capable agent: {no_agent}")
                elif follow.no_agent and not no_agent:
                    capable = [a["agent_id"] for a in agents if can_run(a, request)]
                    note(f"{', '.join(capable)} can run it")
                follow.no_agent = no_agent
                next_agents_check = loop.time() + AGENTS_POLL_SECONDS
            await asyncio.sleep(POLL_SECONDS)


def can_run(agent: dict[str, Any], request: SubmitTaskRequest) -> bool:
    """Whether an agent (a ``request.agents`` record) can run the task: it has every
    required capability and, if its record lists the task types it handles
    (``task_types``; ``*`` for any), this one."""
    if not set(request.required_capabilities) <= set(agent.get("capabilities") or ()):
        return False
    types = agent.get("task_types")
    return not types or "*" in types or request.task_type in types


def no_capable_agent(agents: list[dict[str, Any]], request: SubmitTaskRequest) -> str | None:
    """Why none of ``agents`` (``request.agents`` records) can run the task; None if one can."""
    if any(can_run(agent, request) for agent in agents):
        return None
    if not agents:
        return "no agent is registered"
    required = set(request.required_capabilities)
    if any(required <= set(a.get("capabilities") or ()) for a in agents):
        return f"no registered agent with its capabilities handles task type {request.task_type!r}"
    held = {c for a in agents for c in a.get("capabilities") or ()}
    missing = sorted(required - held)
    if missing:
        return f"no registered agent has capability {', '.join(repr(c) for c in missing)}"
    return f"no registered agent has all of {', '.join(repr(c) for c in sorted(required))}"
