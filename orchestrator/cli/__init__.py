"""The command line, installed as ``orchestrator`` (also ``python -m orchestrator``).

``serve`` runs the orchestrator; ``agent run`` runs an agent from user code;
``submit``, ``status``, ``cancel``, ``stats``, ``agents`` and ``tasks`` talk to
a running ``serve`` with the request protocol on ``<prefix>.rpc``
(``broker.rpc``), exactly as any other service would; ``watch`` shows events,
queue depths and agent load live; ``demo`` runs the seed's workflow;
``topology`` and ``schemas`` export the RabbitMQ definitions and the
wire-message schemas; ``purge`` deletes a prefix's queues and exchanges.

Settings come from options, else ``ORCHESTRATOR_*`` environment variables
(pydantic-settings), else defaults. Every error is caught here and printed as
one line, ``error: ...``, on stderr, with the broker password blanked out;
in data (results, ``--json``) only a URL's ``user:password@`` is, so that the
password as a plain word in a task's result is printed as it is.

Each command is a module (``serve``, ``agent``, ``submit`` with ``follow``
for ``--wait``, ``requests``, ``watch``, ``exports``, ``purge``); this one wires
them into one parser and is the boundary where errors become exit codes.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
from typing import Annotated

import typer
from pydantic import ValidationError

from broker import BusError, NoReply, redact_url
from broker.rabbitmq_link import BrokerRefused

from . import agent, exports, purge, requests, serve, submit, watch
from .connection import Interrupted
from .errors import (
    EXIT_BAD_INPUT,
    EXIT_CODES_HELP,
    EXIT_OK,
    EXIT_TASK_DID_NOT_COMPLETE,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    EXIT_WAIT_TIMED_OUT,
    CliError,
)
from .escaping import escape_line
from .logs import setup_logging
from .output import out
from .redaction import remember_secret, scrub
from .settings import CONNECTION_OPTIONS, connection_options

__all__ = [
    # the console script
    "main",
    "app",
    # how a command ends
    "CliError",
    "EXIT_OK",
    "EXIT_BAD_INPUT",
    "EXIT_USAGE",
    "EXIT_UNREACHABLE",
    "EXIT_TASK_DID_NOT_COMPLETE",
    "EXIT_WAIT_TIMED_OUT",
]

log = logging.getLogger(__name__)

DISTRIBUTION = "rabbit-task-orchestrator"
"""The name ``pip`` knows this project by (pyproject.toml)."""

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

for _command in (
    serve.serve,
    submit.submit,
    requests.status,
    requests.cancel,
    requests.stats,
    requests.agents,
    requests.tasks,
    watch.watch,
    agent.demo,
    exports.topology,
    exports.schemas,
    purge.purge,
):
    app.command(epilog=EXIT_CODES_HELP)(connection_options(_command))
agent_app.command("run", epilog=EXIT_CODES_HELP)(connection_options(agent.agent_run))


@agent_app.callback(invoke_without_command=True)
def _help_without_a_command(context: typer.Context) -> None:
    if context.invoked_subcommand is None:
        print(context.get_help())
        raise typer.Exit(EXIT_USAGE)


def version() -> str:
    """The installed distribution's version (the source tree's, when not installed)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _print_version(wanted: bool) -> None:
    if wanted:
        print(f"orchestrator {version()}")
        raise typer.Exit(EXIT_OK)


@app.callback(invoke_without_command=True)
def _top(
    context: typer.Context,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    _help_without_a_command(context)


# --- the boundary -------------------------------------------------------------------------------


PIPED_WIDTH = 4096
"""The width tables may take when stdout is not a terminal (``--json`` is the
machine format; a table piped to ``grep`` or a file should still be whole)."""

OPTIONS = {"broker_url": ("--broker", "-b"), "prefix": ("--prefix",), **CONNECTION_OPTIONS}
"""The option that gives a setting on every command that takes it."""


def _setting_name(field: str, args: list[str], given: object = None) -> str:
    """How the user gave ``field``: its option, ``ORCHESTRATOR_X='value'`` (the value
    when ``given`` is it, so the user sees which), ``ORCHESTRATOR_X``, or the field."""
    options = OPTIONS.get(field, ())
    if any(arg in options or arg.startswith(f"{o}=") for arg in args for o in options):
        return options[0]
    variable = f"ORCHESTRATOR_{field.upper()}"
    from_environment = os.environ.get(variable)
    if isinstance(given, str) and from_environment is not None:
        if from_environment.strip() == given.strip():
            return f"{variable}={given!r}"  # a setting from the environment: say which
    if from_environment:
        return variable
    return field


def _redacted(url: str) -> str:
    try:
        return redact_url(url)
    except ValueError:
        return url


def _one_line(exc: BaseException, args: list[str]) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        given = first.get("input")
        if isinstance(given, str) and f"got {_redacted(given)!r}" in message:
            given = None  # the message shows it already (without its password)
        where = _setting_name(field, args, given) if field else exc.title
        message = f"{where}: {message}"
    elif isinstance(exc, BrokerRefused):
        where = _setting_name(exc.setting, args)
        message = f"{where}: {str(exc).removeprefix(exc.setting + ': ')}"
    else:
        message = str(exc) or type(exc).__name__
    return scrub(" ".join(message.split()))


def _fail(message: str, code: int) -> int:
    # An error may quote what the bus sent (a task's field): one line, controls escaped.
    # Written as it is, as ``err.print`` would without markup, emoji or wrapping,
    # but without importing rich, which a command that only fails need not pay for.
    sys.stderr.write(f"error: {escape_line(str(message))}\n")
    sys.stderr.flush()
    return code


def main(argv: list[str] | None = None) -> int:
    """The console script: run one command, turn every error into one line and an exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    remember_secret(os.environ.get("ORCHESTRATOR_BROKER_URL"))
    for arg in args:
        if "://" in arg:
            remember_secret(arg.partition("=")[2] if arg.startswith("--") else arg)
    if not logging.getLogger().handlers:
        setup_logging("warning")
    out.at_least_when_piped(PIPED_WIDTH)  # piped: tables as wide as their cells, never cut
    try:
        result = app(args=args, prog_name="orchestrator", standalone_mode=False)
    except typer.TyperException as exc:  # the command line's own errors: usage
        context = getattr(exc, "ctx", None)
        command = context.command_path if context is not None else "orchestrator"
        message = scrub(" ".join(exc.format_message().split()))
        return _fail(f"{message} (see '{command} --help')", EXIT_USAGE)
    except (typer.Abort, KeyboardInterrupt):
        return _fail("interrupted", 130)
    except Interrupted as exc:  # SIGINT or SIGTERM ended it early (see connection.run)
        return _fail(str(exc), exc.code)
    except CliError as exc:
        return _fail(_one_line(exc, args), exc.code)
    except BrokerRefused as exc:  # a setting to fix (user, password, vhost), not an outage
        return _fail(_one_line(exc, args), EXIT_BAD_INPUT)
    except (NoReply, ConnectionError) as exc:
        return _fail(_one_line(exc, args), EXIT_UNREACHABLE)
    except ValueError as exc:  # pydantic's ValidationError, InvalidMessage, bad settings
        return _fail(_one_line(exc, args), EXIT_BAD_INPUT)
    except BusError as exc:
        return _fail(_one_line(exc, args), EXIT_UNREACHABLE)
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        return _fail(f"{type(exc).__name__}: {_one_line(exc, args)}", EXIT_BAD_INPUT)
    return result if isinstance(result, int) else EXIT_OK
