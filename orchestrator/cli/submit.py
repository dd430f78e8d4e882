"""``submit``: the one command that makes a task.

Its options become a ``SubmitTaskRequest`` on ``<prefix>.rpc`` (``broker.rpc``),
checked before anything connects, and a field the request refuses is named
by the option that gave it (``--depends-on``, not ``dependencies``). It prints
the task's id; with ``--wait`` it then follows the task (``follow``). The
other requests (``status``, ``cancel``, ``stats``, ``agents``, ``tasks``)
send one message and print the answer: ``requests``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from broker import BusSettings, SubmitTaskRequest

from .connection import call, client, connected, run
from .errors import EXIT_OK, CliError
from .follow import Follow, ended, follow_task, gave_up
from .output import print_json
from .requests import split_values
from .settings import AsJson, Broker, Prefix, read_settings


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
            dependencies=split_values(depends_on),
            required_capabilities=split_values(requires),
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
                status = await follow_task(bus, task_id, request, request_timeout, follow)
        except TimeoutError:
            if not deadline.expired():
                raise  # NoReply, a TimeoutError too: the orchestrator did not answer
            return gave_up(task_id, follow, as_json)
    return ended(task_id, status, as_json)
