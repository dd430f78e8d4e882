"""``submit``, ``status``, ``cancel``, ``stats``, ``agents`` and ``tasks``: requests to a running ``serve``.

They speak the request protocol on ``<prefix>.rpc`` (``broker.messages``)
exactly as any other service would, so that whatever the command line does,
another service can do too.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from broker import (
    AgentsRequest,
    BusSettings,
    CancelTaskRequest,
    RabbitMQBus,
    StatsRequest,
    SubmitTaskRequest,
    TaskStatusRequest,
    WireMessage,
)
from broker.rpc import MAX_TASKS_LISTED, TasksRequest

from ..models import TaskStatus
from .connection import call, client, connected, run
from .errors import EXIT_OK, EXIT_TASK_DID_NOT_COMPLETE, EXIT_WAIT_TIMED_OUT, CliError
from .escaping import escape_line
from .output import agents_table, block, cell, err, out, print_fields, print_json, print_table
from .redaction import scrub, scrub_urls
from .settings import AsJson, Broker, Prefix, read_settings

POLL_SECONDS = 0.2
"""How often ``submit --wait`` asks for the task's status."""
AGENTS_POLL_SECONDS = 1.0
"""How often ``submit --wait`` asks, while the task waits, whether an agent can run it."""


def _split(values: Iterable[str] | None) -> list[str]:
    """Repeated and comma-separated option values, as one list."""
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]


def _read_payload(text: str) -> dict[str, Any]:
    if text.startswith("@"):
        source = text[1:]
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text()
        except OSError as exc:
            raise CliError(f"--payload: cannot read {source!r}: {exc.strerror or exc}") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"--payload: not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise CliError(f"--payload: must be a JSON object, got {type(payload).__name__}")
    return payload


def submit(
    task_type: Annotated[
        str, typer.Argument(metavar="TASK_TYPE", help="The task's type: which handler runs it.")
    ],
    payload: Annotated[
        str,
        typer.Option(
            "--payload",
            "-p",
            metavar="JSON|@FILE",
            help="A JSON object, or @FILE holding one (@- for stdin).",
        ),
    ] = "{}",
    name: Annotated[
        str | None,
        typer.Option(metavar="TEXT", help="Default: the task type.", show_default=False),
    ] = None,
    description: Annotated[str, typer.Option(metavar="TEXT")] = "",
    priority: Annotated[
        str, typer.Option(metavar="PRIORITY", help="low, medium, high or critical.")
    ] = "medium",
    requires: Annotated[
        list[str] | None,
        typer.Option(
            "--requires",
            "-r",
            metavar="CAPABILITY",
            help="A capability the agent must have; repeat it or separate with commas.",
            show_default=False,
        ),
    ] = None,
    depends_on: Annotated[
        list[str] | None,
        typer.Option(
            "--depends-on",
            "-d",
            metavar="TASK_ID",
            help="Id of a task that must complete first; repeat it or separate with commas.",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option(metavar="SECONDS", help="How long one attempt may run.")
    ] = 600,
    estimated_duration: Annotated[
        float, typer.Option(metavar="SECONDS", help="A short task ranks higher in its class.")
    ] = 300,
    max_retries: Annotated[int, typer.Option(metavar="N")] = 3,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            metavar="KEY",
            help="Submitting again with this key gives the first task's id, and makes no new task.",
            show_default=False,
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Follow the task to its end with a progress bar.")
    ] = False,
    wait_timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="With --wait (implied): give up after this long, exit 5; the task goes on.",
            show_default=False,
        ),
    ] = None,
    as_json: AsJson = False,
    broker: Broker = None,
    prefix: Prefix = None,
) -> int:
    """Submit a task to a running orchestrator; prints its id."""
    try:  # the request checks its fields (the priority too) before anything connects
        request = SubmitTaskRequest(
            name=name or task_type,
            description=description,
            task_type=task_type,
            payload=_read_payload(payload),
            priority=priority,
            dependencies=_split(depends_on),
            required_capabilities=_split(requires),
            estimated_duration=estimated_duration,
            timeout=timeout,
            max_retries=max_retries,
            idempotency_key=idempotency_key,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        option = _SUBMIT_OPTIONS.get(field, field or "submit")
        message = str(first["msg"]).removeprefix("Value error, ")
        raise CliError(f"{option}: {message}") from None
    if wait_timeout is not None and not wait_timeout > 0:
        raise CliError(f"--wait-timeout: must be greater than 0, got {wait_timeout:g}")
    settings, cli_settings = read_settings(broker, prefix)
    follow = Follow(wait_timeout) if wait or wait_timeout is not None else None
    return run(_submit(settings, request, follow, as_json, cli_settings.request_timeout))


_SUBMIT_OPTIONS = {
    "name": "--name",
    "description": "--description",
    "task_type": "TASK_TYPE",
    "payload": "--payload",
    "priority": "--priority",
    "dependencies": "--depends-on",
    "required_capabilities": "--requires",
    "estimated_duration": "--estimated-duration",
    "timeout": "--timeout",
    "max_retries": "--max-retries",
    "idempotency_key": "--idempotency-key",
}
"""The option of ``submit`` that gives each field of ``SubmitTaskRequest``."""


class Follow:
    """How ``submit --wait`` follows its task: how long at most, what it has said."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.status: dict[str, Any] | None = None
        """The task's last status seen."""
        self.no_agent: str | None = None
        """Why no registered agent can run the task, while that is so."""


async def _submit(
    settings: BusSettings,
    request: SubmitTaskRequest,
    follow: Follow | None,
    as_json: bool,
    request_timeout: float,
) -> int:
    async with connected(client(settings)) as bus:
        task_id = (await call(bus, request, request_timeout))["task_id"]
        if follow is None:
            if as_json:
                print_json({"task_id": task_id})
            else:
                print(task_id)
            return EXIT_OK
        if not as_json:
            print(task_id, flush=True)
        try:
            async with asyncio.timeout(follow.timeout) as deadline:
                status = await _follow(bus, task_id, request, request_timeout, follow)
        except TimeoutError:
            if not deadline.expired():
                raise  # NoReply, a TimeoutError too: the orchestrator did not answer
            return _gave_up(task_id, follow, as_json)
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


def _gave_up(task_id: str, follow: Follow, as_json: bool) -> int:
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


async def _follow(
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


def _when(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return datetime.fromtimestamp(value).isoformat(sep=" ", timespec="seconds")


def status(
    task_id: Annotated[str, typer.Argument(metavar="TASK_ID", help="The id submit printed.")],
    as_json: AsJson = False,
    broker: Broker = None,
    prefix: Prefix = None,
) -> None:
    """Show a task's status, progress and result."""
    result = run(_request(broker, prefix, TaskStatusRequest(task_id=task_id)))
    if as_json:
        print_json(result)
        return
    rows = []
    trace = result.get("traceback")
    for key, value in result.items():
        if key == "traceback":
            value = "(below)" if trace else None
        elif key.endswith("_at"):
            value = _when(value)
        elif key == "progress":
            value = f"{value:.0%}"
        elif isinstance(value, dict | list):
            value = json.dumps(value)
        rows.append((key, cell("-" if value is None else value)))
    print_fields(rows)
    if trace:  # as the agent sent it, lines and indents kept; no markup, no controls
        from rich.text import Text

        out.print(Text("traceback:"))
        out.print(block(str(trace).rstrip("\n")), soft_wrap=True)


def cancel(
    task_id: Annotated[str, typer.Argument(metavar="TASK_ID", help="The id submit printed.")],
    as_json: AsJson = False,
    broker: Broker = None,
    prefix: Prefix = None,
) -> None:
    """Cancel a task that has not ended (exit 1 if it had)."""
    result = run(_request(broker, prefix, CancelTaskRequest(task_id=task_id)))
    if as_json:
        print_json(result)
    if not result["cancelled"]:
        raise CliError(f"task {task_id} has already ended ({result['status']}); nothing to cancel")
    if not as_json:
        print(f"cancelled {task_id}")


def stats(as_json: AsJson = False, broker: Broker = None, prefix: Prefix = None) -> None:
    """Show the orchestrator's statistics (get_stats)."""
    result = run(_request(broker, prefix, StatsRequest()))
    if as_json:
        print_json(result)
        return
    from rich.table import Table

    table = Table("statistic", "value", title="orchestrator statistics")
    for key, value in result.items():
        if key == "agent_utilization":
            for agent_id, use in sorted(value.items()):
                table.add_row(cell(f"utilization of {agent_id}"), f"{use:.0%}")
        elif key.endswith("utilization"):
            table.add_row(key, f"{value:.0%}")
        elif isinstance(value, float):
            table.add_row(key, f"{value:.3f}")
        else:
            table.add_row(key, str(value))
    print_table(table)


def agents(as_json: AsJson = False, broker: Broker = None, prefix: Prefix = None) -> None:
    """List the registered agents and their load, and which orchestrator leads."""
    result, leader = run(_agents(broker, prefix))
    if as_json:
        print_json(result)
        return
    print_table(agents_table(result))
    if isinstance(leader, dict) and leader.get("id"):
        out.print(cell(f"leader: {leader['id']} (epoch {leader.get('epoch')})"))


async def _agents(broker: str | None, prefix: str | None) -> tuple[Any, Any]:
    """The agents, and the ``leader`` the answering orchestrator names (None from an old one)."""
    settings, cli_settings = read_settings(broker, prefix)
    async with connected(client(settings)) as bus:
        agents = await call(bus, AgentsRequest(), cli_settings.request_timeout)
        stats = await call(bus, StatsRequest(), cli_settings.request_timeout)
    return agents, stats.get("leader") if isinstance(stats, dict) else None


async def _request(broker: str | None, prefix: str | None, request: WireMessage) -> Any:
    settings, cli_settings = read_settings(broker, prefix)
    async with connected(client(settings)) as bus:
        return await call(bus, request, cli_settings.request_timeout)


def tasks(
    status_: Annotated[
        list[str] | None,
        typer.Option(
            "--status",
            "-s",
            metavar="STATUS",
            help="Only tasks in this status (pending, assigned, running, completed, failed,"
            " cancelled, timeout); repeat it or separate with commas.",
            show_default=False,
        ),
    ] = None,
    task_type: Annotated[
        str | None,
        typer.Option("--type", "-t", metavar="TASK_TYPE", help="Only tasks of this type."),
    ] = None,
    agent_id: Annotated[
        str | None,
        typer.Option(
            "--agent", "-a", metavar="AGENT_ID", help="Only tasks this agent holds or ran."
        ),
    ] = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit", "-n", metavar="N", help=f"At most this many (1 to {MAX_TASKS_LISTED})."
        ),
    ] = 50,
    as_json: AsJson = False,
    broker: Broker = None,
    prefix: Prefix = None,
) -> None:
    """List the tasks the orchestrator holds, most recently created first."""
    statuses = [s.lower() for s in _split(status_)]
    try:
        request = TasksRequest(status=statuses, task_type=task_type, agent_id=agent_id, limit=limit)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        option = {"status": "--status", "task_type": "--type", "agent_id": "--agent"}.get(
            field, f"--{field}" if field else "tasks"
        )
        message = str(first["msg"]).removeprefix("Value error, ")
        given = first.get("input")
        raise CliError(f"{option}: {message}, got {given!r}") from None
    result = run(_request(broker, prefix, request))
    if as_json:
        print_json(result)
        return
    from rich.table import Table

    table = Table("task", "name", "type", "status", "agent", "created", "ended", "retries")
    for task in result:
        table.add_row(
            cell(task["task_id"]),
            cell(task["name"]),
            cell(task["task_type"]),
            cell(task["status"]),
            cell(task["assigned_agent"] or "-"),
            _when(task["created_at"]),
            _when(task["completed_at"]),
            str(task["retry_count"]),
        )
    if not result:
        table.add_row("(none)", "", "", "", "", "", "", "")
    print_table(table)
