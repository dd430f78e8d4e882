"""``status``, ``cancel``, ``stats``, ``agents`` and ``tasks``: requests to a running ``serve``.

They speak the request protocol on ``<prefix>.rpc`` (``broker.messages``)
exactly as any other service would, so that whatever the command line does,
another service can do too. Each sends one request (``agents`` two) and
prints the answer, as a table or ``--json``. ``submit``, which makes a task
and may follow it to its end, has a module of its own (``submit``, ``follow``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from broker import (
    AgentsRequest,
    CancelTaskRequest,
    StatsRequest,
    TaskStatusRequest,
    WireMessage,
)
from broker.rpc import MAX_TASKS_LISTED, TasksRequest

from .connection import call, client, connected, run
from .errors import CliError
from .output import agents_table, block, cell, out, print_fields, print_json, print_table
from .settings import AsJson, Broker, Prefix, read_settings


def split_values(values: Iterable[str] | None) -> list[str]:
    """Repeated and comma-separated option values, as one list (``tasks --status``,
    and ``submit``'s ``--requires`` and ``--depends-on``)."""
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]


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
    statuses = [s.lower() for s in split_values(status_)]
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
