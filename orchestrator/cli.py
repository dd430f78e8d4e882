"""The command line, installed as ``orchestrator`` (also ``python -m orchestrator``).

``serve`` runs the orchestrator; ``agent run`` runs an agent from user code;
``submit``, ``status``, ``cancel``, ``stats`` and ``agents`` talk to a running
``serve`` with the request protocol on ``<prefix>.rpc`` (``broker.messages``),
exactly as any other service would; ``watch`` shows events, queue depths and
agent load live; ``demo`` runs the seed's workflow; ``topology`` and
``schemas`` export the RabbitMQ definitions and the wire-message schemas.

Settings come from options, else ``ORCHESTRATOR_*`` environment variables
(pydantic-settings), else defaults. Every error is caught here and printed as
one line, ``error: ...``, on stderr, with the broker password blanked out;
in data (results, ``--json``) only a URL's ``user:password@`` is, so that the
password as a plain word in a task's result is printed as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from broker import (
    DEFAULT_REQUEST_TIMEOUT,
    AgentAnnounced,
    AgentHeartbeat,
    AgentLeft,
    AgentsRequest,
    BusError,
    BusSettings,
    CancelTaskRequest,
    Event,
    NoReply,
    QueuesRequest,
    RabbitMQBus,
    StatsRequest,
    SubmitTaskRequest,
    TaskFinished,
    TaskProgress,
    TaskStarted,
    TaskStatusRequest,
    Topology,
    TopologyMissing,
    WireMessage,
    default_broker_url,
    redact_url,
)

from .models import TaskStatus

log = logging.getLogger("orchestrator.cli")

# --- exit codes -----------------------------------------------------------------

EXIT_OK = 0
EXIT_BAD_INPUT = 1
"""Bad input, an unknown task, or a request the orchestrator refused."""
EXIT_USAGE = 2
"""The command line itself is wrong: unknown command or option, missing argument."""
EXIT_UNREACHABLE = 3
"""The broker cannot be reached, or no orchestrator answers on its request queue."""
EXIT_TASK_DID_NOT_COMPLETE = 4
"""``submit --wait``: the task ended failed, timeout or cancelled."""

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 bad input, unknown task id, or a request the orchestrator"
    " refused; 2 usage error; 3 broker unreachable or no orchestrator answering;"
    " 4 submit --wait: the task ended failed, timeout or cancelled."
)

POLL_SECONDS = 0.2
"""How often ``submit --wait`` asks for the task's status."""


class CliError(Exception):
    """An error to print as one line, with the exit code it gives."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


class CliSettings(BaseSettings):
    """What the command line reads from ``ORCHESTRATOR_*`` beyond the bus settings."""

    model_config = SettingsConfigDict(env_prefix="ORCHESTRATOR_", extra="ignore")

    store: str = Field(default="memory", description="state store of serve: memory | sqlite:PATH")
    request_timeout: float = Field(
        default=DEFAULT_REQUEST_TIMEOUT, gt=0, description="seconds to wait for a reply"
    )


# --- secrets ---------------------------------------------------------------------

_secrets: set[tuple[str, str]] = set()
"""(username, password) of every broker URL seen, to blank out of messages."""


def _remember_secret(url: str | None) -> None:
    if not url:
        return
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return
    if password:
        _secrets.add((parts.username or "", password))


def scrub(text: str) -> str:
    """``text`` without any broker password we know of: for errors and logs."""
    for username, password in _secrets:
        text = text.replace(f":{password}@", ":***@")
        if password != username:  # a password equal to the user name is shown anyway
            text = text.replace(password, "***")
    return text


_URL_USER = r"(?:amqps?|https?)://[^\s/?#@:]*:"
"""The start of a URL up to its password: scheme, ``//``, user name and ``:``."""


def scrub_urls(text: str) -> str:
    """``text`` with a known password blanked out where it is a URL's ``user:password@``.

    For data (task results, ``--json``): anything else, the password as a plain
    word too, stays as it is, so that user data and JSON are never altered.
    """
    for _, password in _secrets:
        pattern = f"({_URL_USER}){re.escape(password)}@"
        text = re.sub(pattern, lambda match: f"{match.group(1)}***@", text, flags=re.IGNORECASE)
    return text


class _LogFilter(logging.Filter):
    """Blanks out passwords; hides the AMQP libraries' own logs until connected.

    Until then a failed connect is reported once, by ``main``, as one line;
    afterwards their reconnect messages are what an operator wants to see.
    """

    transport_quiet = True

    def filter(self, record: logging.LogRecord) -> bool:
        if self.transport_quiet and record.name.startswith(("aiormq", "aio_pika")):
            return False
        if _secrets:
            _scrub_record(record)
        return True


_formatter = logging.Formatter()


def _scrub_record(record: logging.LogRecord) -> None:
    """The record's message, traceback and stack without any password we know of.

    The traceback is formatted here, scrubbed, and kept in ``exc_text``, which
    every ``logging.Formatter`` prints instead of formatting ``exc_info`` again.
    """
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: keep what there is, as text
        message = f"{record.msg} {record.args}"
    record.msg = scrub(message)
    record.args = None
    if record.exc_info and not record.exc_text:
        record.exc_text = _formatter.formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = scrub(record.exc_text)
    if record.stack_info:
        record.stack_info = scrub(record.stack_info)


_log_filter = _LogFilter()


def _setup_logging(level: str | Enum) -> None:
    level = level.value if isinstance(level, Enum) else level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_log_filter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# --- settings ------------------------------------------------------------------------


def _settings(broker: str | None, prefix: str | None) -> tuple[BusSettings, CliSettings]:
    """Options over ``ORCHESTRATOR_*`` over defaults; the local broker if none is set.

    Read once per command, before anything connects: a bad ``ORCHESTRATOR_*``
    value is an error of every command, whichever setting it uses.
    """
    overrides: dict[str, Any] = {}
    if broker is not None:
        overrides["broker_url"] = broker
    if prefix is not None:
        overrides["prefix"] = prefix
    settings = BusSettings(**overrides)
    cli_settings = CliSettings()
    if not settings.broker_url:
        settings = settings.model_copy(update={"broker_url": default_broker_url()})
    _remember_secret(settings.broker_url)
    return settings, cli_settings


def _client(settings: BusSettings) -> RabbitMQBus:
    """A connection that only sends requests: it declares nothing on the broker."""
    return RabbitMQBus(
        settings=settings, connection_name=f"{settings.prefix}:cli", declare_topology=False
    )


@contextlib.asynccontextmanager
async def _connected(bus: RabbitMQBus) -> AsyncIterator[RabbitMQBus]:
    await bus.connect()
    try:
        yield bus
    finally:
        await bus.close()


async def _call(bus: RabbitMQBus, request: WireMessage, timeout: float) -> Any:
    """The result of a request to the orchestrator; ``CliError`` when it refuses."""
    reply = await bus.request(request, timeout=timeout)
    if reply.ok:
        return reply.result
    assert reply.error is not None
    code = EXIT_UNREACHABLE if reply.error.type == "unavailable" else EXIT_BAD_INPUT
    raise CliError(reply.error.message, code)


# --- options shared by commands -------------------------------------------------------

Broker = Annotated[
    str | None,
    typer.Option(
        "--broker",
        "-b",
        metavar="URL",
        help="amqp:// URL of RabbitMQ. Env: ORCHESTRATOR_BROKER_URL; default: the local broker.",
        show_default=False,
    ),
]
Prefix = Annotated[
    str | None,
    typer.Option(
        "--prefix",
        metavar="PREFIX",
        help="Prefix of every exchange and queue. Env: ORCHESTRATOR_PREFIX; default: orchestrator.",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class LogLevelName(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


LogLevel = Annotated[LogLevelName, typer.Option("--log-level", help="How much to log on stderr.")]

app = typer.Typer(
    name="orchestrator",
    help="A task orchestrator for fleets of worker agents, with RabbitMQ as its bus.",
    epilog=EXIT_CODES_HELP,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
agent_app = typer.Typer(
    help="Run agents defined in your code.", epilog=EXIT_CODES_HELP, rich_markup_mode=None
)
app.add_typer(agent_app, name="agent")


@app.callback(invoke_without_command=True)
@agent_app.callback(invoke_without_command=True)
def _help_without_a_command(context: typer.Context) -> None:
    if context.invoked_subcommand is None:
        print(context.get_help())
        raise typer.Exit(EXIT_USAGE)


# No markup or emoji codes: task names, errors and results are shown as they are.
out = Console(emoji=False, markup=False)
err = Console(stderr=True, emoji=False, markup=False)


def _print_json(data: Any) -> None:
    print(scrub_urls(json.dumps(data, indent=2, default=str)))


# --- serve -----------------------------------------------------------------------------


@app.command(epilog=EXIT_CODES_HELP)
def serve(
    broker: Broker = None,
    prefix: Prefix = None,
    store: Annotated[
        str | None,
        typer.Option(
            metavar="STORE",
            help="Where task records live: memory, or sqlite:PATH. Env: ORCHESTRATOR_STORE.",
            show_default=False,
        ),
    ] = None,
    log_level: LogLevel = LogLevelName.info,
) -> None:
    """Run the orchestrator and answer requests on <prefix>.rpc until SIGTERM or Ctrl-C."""
    _setup_logging(log_level)
    settings, cli_settings = _settings(broker, prefix)
    state = _open_store(store if store is not None else cli_settings.store)
    asyncio.run(_serve(settings, state))


def _open_store(spec: str) -> Any:
    """The ``StateStore`` a ``--store`` value names (None: the orchestrator's memory store)."""
    kind, _, path = spec.partition(":")
    if spec == "memory":
        return None
    if kind == "sqlite" and path:
        from .sqlite_store import SQLiteStore

        return SQLiteStore(path)
    raise CliError(f"--store: expected 'memory' or 'sqlite:PATH', got {spec!r}")


async def _serve(settings: BusSettings, store: Any) -> None:
    from .service import OrchestratorService
    from .task_orchestrator import TaskOrchestrator

    bus = RabbitMQBus(settings=settings, connection_name=f"{settings.prefix}:orchestrator")
    orchestrator = TaskOrchestrator(bus, store=store)
    service = OrchestratorService(orchestrator)
    stop = _stop_on_signals()
    try:
        await orchestrator.start()
    except BaseException:
        await orchestrator.store.close()
        raise
    _log_filter.transport_quiet = False
    try:
        await service.start()
        log.info(
            "serving prefix %r on %s; requests on %s",
            settings.prefix,
            redact_url(settings.broker_url or ""),
            bus.topology.rpc_queue,
        )
        await stop.wait()
        log.info("stopping")
    finally:
        await service.stop()
        await orchestrator.stop()


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: a graceful stop instead of a traceback."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


# --- agent run ---------------------------------------------------------------------------


@agent_app.command("run", epilog=EXIT_CODES_HELP)
def agent_run(
    spec: Annotated[
        str,
        typer.Argument(
            metavar="MODULE:OBJECT",
            help="An Agent in your code, or a function returning one (my_agents:agent).",
        ),
    ],
    broker: Broker = None,
    prefix: Prefix = None,
    log_level: LogLevel = LogLevelName.info,
) -> None:
    """Run an agent until SIGTERM or Ctrl-C; running tasks finish first."""
    _setup_logging(log_level)
    settings, _ = _settings(broker, prefix)
    # An entry point that runs agents: the one place besides demo that imports both.
    from agents import load_agent

    sys.path.insert(0, os.getcwd())  # modules beside the user, as `python -m` would
    try:
        agent = load_agent(spec)
    except ImportError as exc:
        raise CliError(f"agent: cannot import {spec.partition(':')[0]!r}: {exc}") from None
    except ValueError:
        raise
    except Exception as exc:  # the user's code failed while building the agent
        raise CliError(f"agent: {spec} failed: {type(exc).__name__}: {exc}") from None
    asyncio.run(_run_agent(agent, settings))


async def _run_agent(agent: Any, settings: BusSettings) -> None:
    bus = RabbitMQBus(settings=settings, connection_name=f"agent:{agent.agent_id}")
    await bus.connect()
    _log_filter.transport_quiet = False
    try:
        await agent.serve(bus)
    finally:
        await bus.close()


# --- requests to a running orchestrator ------------------------------------------------


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


@app.command(epilog=EXIT_CODES_HELP)
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
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Follow the task to its end with a progress bar.")
    ] = False,
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
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        option = _SUBMIT_OPTIONS.get(field, field or "submit")
        message = str(first["msg"]).removeprefix("Value error, ")
        raise CliError(f"{option}: {message}") from None
    settings, cli_settings = _settings(broker, prefix)
    return asyncio.run(_submit(settings, request, wait, as_json, cli_settings.request_timeout))


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
}
"""The option of ``submit`` that gives each field of ``SubmitTaskRequest``."""


async def _submit(
    settings: BusSettings,
    request: SubmitTaskRequest,
    wait: bool,
    as_json: bool,
    request_timeout: float,
) -> int:
    async with _connected(_client(settings)) as bus:
        task_id = (await _call(bus, request, request_timeout))["task_id"]
        if not wait:
            if as_json:
                _print_json({"task_id": task_id})
            else:
                print(task_id)
            return EXIT_OK
        if not as_json:
            print(task_id, flush=True)
        status = await _follow(bus, task_id, request.name, request_timeout)
    if as_json:
        _print_json(status)
    else:
        took = ""
        if status["started_at"]:
            took = f" after {time.time() - status['started_at']:.2f}s"
        outcome = json.dumps(status["result"]) if status["result"] else status["error_message"]
        agent = status["assigned_agent"] or "no agent"
        print(scrub_urls(f"{status['status']}{took} on {agent}: {outcome}"))
    if status["status"] != TaskStatus.COMPLETED.value:
        err.print(
            scrub(f"error: task {task_id} ended {status['status']}: {status['error_message']}"),
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_TASK_DID_NOT_COMPLETE
    return EXIT_OK


async def _follow(
    bus: RabbitMQBus, task_id: str, name: str, request_timeout: float
) -> dict[str, Any]:
    """Poll the task's status until it ends, drawing its progress on stderr."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err) as progress:
        bar = progress.add_task(escape(name), total=1.0)
        while True:
            status = await _call(bus, TaskStatusRequest(task_id=task_id), request_timeout)
            description = escape(f"{name} [{status['status']}]")
            progress.update(bar, completed=status["progress"], description=description)
            if TaskStatus(status["status"]).is_final:
                return status
            await asyncio.sleep(POLL_SECONDS)


def _when(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return datetime.fromtimestamp(value).isoformat(sep=" ", timespec="seconds")


@app.command(epilog=EXIT_CODES_HELP)
def status(
    task_id: Annotated[str, typer.Argument(metavar="TASK_ID", help="The id submit printed.")],
    as_json: AsJson = False,
    broker: Broker = None,
    prefix: Prefix = None,
) -> None:
    """Show a task's status, progress and result."""
    result = asyncio.run(_request(broker, prefix, TaskStatusRequest(task_id=task_id)))
    if as_json:
        _print_json(result)
        return
    table = Table(show_header=False, box=None)
    for key, value in result.items():
        if key.endswith("_at"):
            value = _when(value)
        elif key == "progress":
            value = f"{value:.0%}"
        elif isinstance(value, dict | list):
            value = json.dumps(value)
        table.add_row(key, Text("-" if value is None else scrub_urls(str(value))))
    out.print(table)


@app.command(epilog=EXIT_CODES_HELP)
def cancel(
    task_id: Annotated[str, typer.Argument(metavar="TASK_ID", help="The id submit printed.")],
    as_json: AsJson = False,
    broker: Broker = None,
    prefix: Prefix = None,
) -> None:
    """Cancel a task that has not ended (exit 1 if it had)."""
    result = asyncio.run(_request(broker, prefix, CancelTaskRequest(task_id=task_id)))
    if as_json:
        _print_json(result)
    if not result["cancelled"]:
        raise CliError(f"task {task_id} has already ended ({result['status']}); nothing to cancel")
    if not as_json:
        print(f"cancelled {task_id}")


@app.command(epilog=EXIT_CODES_HELP)
def stats(as_json: AsJson = False, broker: Broker = None, prefix: Prefix = None) -> None:
    """Show the orchestrator's statistics (get_stats)."""
    result = asyncio.run(_request(broker, prefix, StatsRequest()))
    if as_json:
        _print_json(result)
        return
    table = Table("statistic", "value", title="orchestrator statistics")
    for key, value in result.items():
        if key == "agent_utilization":
            for agent_id, use in sorted(value.items()):
                table.add_row(f"utilization of {agent_id}", f"{use:.0%}")
        elif key.endswith("utilization"):
            table.add_row(key, f"{value:.0%}")
        elif isinstance(value, float):
            table.add_row(key, f"{value:.3f}")
        else:
            table.add_row(key, str(value))
    out.print(table)


@app.command(epilog=EXIT_CODES_HELP)
def agents(as_json: AsJson = False, broker: Broker = None, prefix: Prefix = None) -> None:
    """List the registered agents and their load."""
    result = asyncio.run(_request(broker, prefix, AgentsRequest()))
    if as_json:
        _print_json(result)
        return
    out.print(_agents_table(result))


def _agents_table(records: list[dict[str, Any]]) -> Table:
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


async def _request(broker: str | None, prefix: str | None, request: WireMessage) -> Any:
    settings, cli_settings = _settings(broker, prefix)
    async with _connected(_client(settings)) as bus:
        return await _call(bus, request, cli_settings.request_timeout)


# --- watch ----------------------------------------------------------------------------------


@app.command(epilog=EXIT_CODES_HELP)
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
    settings, _ = _settings(broker, prefix)
    asyncio.run(_watch(settings, seconds, refresh))


class _WatchView:
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
            parts.append(Text(scrub(self.note), style="yellow"))
        parts.append(_agents_table(self.agents))
        queues = Table("queue", "capabilities", "waiting", title="task queues")
        for queue in self.queues:
            queues.add_row(
                queue["key"], ", ".join(queue["capabilities"]) or "(any)", str(queue["depth"])
            )
        parts.append(queues)
        events = Table("time", "event", "task / agent", "detail", title="recent events")
        for at, event in self.events:
            subject, detail = _describe(event)
            events.add_row(
                datetime.fromtimestamp(at).strftime("%H:%M:%S"),
                event.kind,
                Text(subject),
                Text(scrub_urls(detail)),
            )
        parts.append(events)
        return Group(*parts)


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
    view = _WatchView(settings)
    stop = _stop_on_signals()
    # Like the request-only clients it declares no topology: only its own
    # exclusive monitor queue, bound to the events exchange.
    bus = RabbitMQBus(
        settings=settings, connection_name=f"{settings.prefix}:watch", declare_topology=False
    )
    async with _connected(bus):
        try:
            await bus.subscribe_events(view.on_event, patterns=["task.#", "agent.#"])
        except TopologyMissing as exc:
            raise CliError(
                f"{exc}: no orchestrator has served prefix {settings.prefix!r} there",
                EXIT_UNREACHABLE,
            ) from None
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds if seconds is not None else None
        with Live(view.render(), console=out, auto_refresh=False) as live:
            while not stop.is_set():
                try:
                    timeout = max(refresh, 1.0)
                    view.agents = await _call(bus, AgentsRequest(), timeout)
                    view.queues = await _call(bus, QueuesRequest(), timeout)
                    view.stats = await _call(bus, StatsRequest(), timeout)
                    view.note = ""
                except (NoReply, CliError) as exc:
                    view.note = str(exc)
                live.update(view.render(), refresh=True)
                left = refresh if end is None else min(refresh, end - loop.time())
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), left)
            live.update(view.render(), refresh=True)
        if not out.is_terminal:
            out.line()  # Live leaves its last frame without a newline when not on a terminal


# --- demo, topology, schemas ---------------------------------------------------------------


@app.command(epilog=EXIT_CODES_HELP)
def demo(
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            "-b",
            metavar="URL",
            help="amqp:// URL of RabbitMQ; default: everything in this process.",
            show_default=False,
        ),
    ] = None,
    workflows: Annotated[int, typer.Option(metavar="N", help="How many workflows to run.")] = 3,
) -> None:
    """Run the seed's trading workflow with example agents; ends with a summary."""
    _remember_secret(broker)
    # An entry point that runs agents: it may import both packages.
    from .demo import run_demo

    result = asyncio.run(run_demo(broker, workflows))
    if result["tasks_failed"]:
        raise CliError(f"{result['tasks_failed']} of {result['tasks_created']} tasks failed")


@app.command(epilog=EXIT_CODES_HELP)
def topology(
    prefix: Prefix = None,
    vhost: Annotated[
        str, typer.Option(metavar="VHOST", help="The virtual host of the definitions.")
    ] = "/",
    export: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE", help="Write the definitions to this file instead.", show_default=False
        ),
    ] = None,
) -> None:
    """Print the RabbitMQ definitions of the fixed topology (importable by RabbitMQ)."""
    settings = BusSettings(**({"prefix": prefix} if prefix is not None else {}))
    text = json.dumps(Topology(settings.prefix).definitions(vhost), indent=2) + "\n"
    if export is None:
        sys.stdout.write(text)
        return
    try:
        export.write_text(text)
    except OSError as exc:
        raise CliError(f"--export: cannot write {str(export)!r}: {exc.strerror or exc}") from None
    err.print(f"wrote {export}", markup=False, highlight=False)


@app.command(epilog=EXIT_CODES_HELP)
def schemas(
    out_dir: Annotated[
        Path,
        typer.Option("--out", metavar="DIR", help="Writes schemas/*.json and asyncapi.json here."),
    ] = Path("docs"),
) -> None:
    """Write the JSON Schemas of every wire message and the AsyncAPI document."""
    from broker.schemas import write

    try:
        written = write(out_dir)
    except OSError as exc:
        raise CliError(f"--out: cannot write to {str(out_dir)!r}: {exc.strerror or exc}") from None
    err.print(f"wrote {len(written)} files under {out_dir}", markup=False, highlight=False)


# --- the boundary -------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or exc.title
        variable = f"ORCHESTRATOR_{where.upper()}"
        given = first.get("input")
        if isinstance(given, str) and os.environ.get(variable) == given:
            where = f"{variable}={given!r}"  # a setting from the environment: say which
        message = f"{where}: {str(first['msg']).removeprefix('Value error, ')}"
    else:
        message = str(exc) or type(exc).__name__
    return scrub(" ".join(message.split()))


def _fail(message: str, code: int) -> int:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """The console script: run one command, turn every error into one line and an exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    _remember_secret(os.environ.get("ORCHESTRATOR_BROKER_URL"))
    for arg in args:
        if "://" in arg:
            _remember_secret(arg.partition("=")[2] if arg.startswith("--") else arg)
    if not logging.getLogger().handlers:
        _setup_logging("warning")
    try:
        result = app(args=args, prog_name="orchestrator", standalone_mode=False)
    except typer.TyperException as exc:  # the command line's own errors: usage
        context = getattr(exc, "ctx", None)
        command = context.command_path if context is not None else "orchestrator"
        message = scrub(" ".join(exc.format_message().split()))
        return _fail(f"{message} (see '{command} --help')", EXIT_USAGE)
    except (typer.Abort, KeyboardInterrupt):
        return _fail("interrupted", 130)
    except CliError as exc:
        return _fail(_one_line(exc), exc.code)
    except (NoReply, ConnectionError) as exc:
        return _fail(_one_line(exc), EXIT_UNREACHABLE)
    except ValueError as exc:  # pydantic's ValidationError, InvalidMessage, bad settings
        return _fail(_one_line(exc), EXIT_BAD_INPUT)
    except BusError as exc:
        return _fail(_one_line(exc), EXIT_UNREACHABLE)
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        return _fail(f"{type(exc).__name__}: {_one_line(exc)}", EXIT_BAD_INPUT)
    return result if isinstance(result, int) else EXIT_OK
