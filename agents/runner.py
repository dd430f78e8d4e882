"""Run an agent defined in user code: ``python -m agents package.module:agent``.

The flags are those of ``orchestrator agent run``, and what they do is
written once, here: ``AgentOptions`` holds them and ``run_agent`` acts on
them for both entry points (each parses them its own way: the orchestrator's
command line with its help and usage errors, this one with ``argparse`` so
that an agent needs none of the command line's dependencies). It exits the
same way:
0 after a graceful stop (SIGTERM, Ctrl-C, or the orchestrator's Unregister),
1 for bad input (a spec that names no Agent, a bad flag value, an id in use),
2 for a usage error, 3 when the broker cannot be reached; errors are one line
on stderr. ``--id`` and ``--concurrency`` override what the code says, so
that one module runs as many agents (one id each) as a deployment needs.
``--reload`` (development only) runs the agent in a child process, started
again whenever a ``.py`` file under the module's folder changes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

from pydantic import SecretStr, ValidationError

from broker import AGENT_ID_PATTERN, BusSettings, RabbitMQBus, event_loop
from broker.errors import BusError
from broker.log_records import ContextFilter, JsonFormatter

from .agent import Agent
from .metrics import serving_metrics

log = logging.getLogger(__name__)

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
"""The exit codes ``orchestrator agent run`` gives for the same ends."""

RELOAD_STOP_SECONDS = 35
"""How long ``--reload`` lets the old process drain (SIGINT) before killing it."""


def load_agent(spec: str) -> Agent:
    """Import ``module:attribute``; the attribute is an ``Agent`` or a function making one."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"agent: expected 'module:object', got {spec!r}")
    module = importlib.import_module(module_name)
    try:
        obj = getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"agent: module {module_name!r} has no {attribute!r}") from None
    if not isinstance(obj, Agent) and callable(obj):
        obj = obj()
    if not isinstance(obj, Agent):
        raise ValueError(f"agent: {spec!r} is not an Agent")
    return obj


def configure(
    agent: Agent, *, agent_id: str | None = None, concurrency: int | None = None
) -> Agent:
    """``agent`` with the id and limit of the command line, before it starts.

    The same object, changed, rather than a copy: handlers that refer to
    their agent (``agent.wait_stopping()``) keep referring to the one that runs.
    """
    if agent_id is not None:
        if not AGENT_ID_PATTERN.match(agent_id):
            raise ValueError(f"--id: {agent_id!r} must be 1-128 of A-Z a-z 0-9 _ . : -")
        agent.agent_id = agent_id
        agent._attempts._agent_id = agent_id
    if concurrency is not None:
        if concurrency < 1:
            raise ValueError(f"--concurrency: must be at least 1, got {concurrency}")
        agent.max_concurrent_tasks = concurrency
        agent._attempts.slots.resize(concurrency)
    return agent


def module_folder(spec: str) -> Path:
    """The folder holding the module of ``module:object`` (found without running it)."""
    module_name = spec.partition(":")[0]
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as exc:
        raise ImportError(str(exc)) from None
    if found is None or not found.origin or found.origin in ("built-in", "frozen"):
        raise ImportError(f"no module named {module_name!r}")
    return Path(found.origin).resolve().parent


def run_with_reload(spec: str, child_args: list[str]) -> int:
    """Run ``python -m agents spec child_args`` until SIGTERM or Ctrl-C, started
    again whenever a ``.py`` file under the module's folder changes."""
    from watchfiles import PythonFilter, run_process

    folder = module_folder(spec)
    command = shlex.join([sys.executable, "-m", "agents", spec, *child_args])
    log.warning("--reload: watching %s for changes to .py files (development only)", folder)
    run_process(
        folder,
        target=command,
        target_type="command",
        watch_filter=PythonFilter(),
        callback=lambda changes: log.warning("--reload: %d change(s): restarting", len(changes)),
        sigint_timeout=RELOAD_STOP_SECONDS,
    )
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """``argparse`` with usage errors as ``orchestrator agent run`` gives them: one
    line on stderr saying where the help is, exit 2 (not the usage block first)."""

    def error(self, message: str) -> NoReturn:
        sys.exit(_fail(f"{message} (see '{self.prog} --help')", EXIT_USAGE))


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m agents",
        description="Run an agent until SIGTERM or Ctrl-C; running tasks finish first.",
    )
    p.add_argument("agent", metavar="MODULE:OBJECT", help="an Agent, or a function returning one")
    p.add_argument(
        "--id", dest="agent_id", metavar="ID", help="the agent's id (default: the code's)"
    )
    p.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="tasks it runs at once, its max_concurrent_tasks (default: the code's)",
    )
    p.add_argument("--broker", "-b", metavar="URL", help="amqp:// URL (ORCHESTRATOR_BROKER_URL)")
    p.add_argument("--prefix", metavar="PREFIX", help="topology prefix (ORCHESTRATOR_PREFIX)")
    p.add_argument(
        "--reload",
        action="store_true",
        help="restart when a .py file under the module's folder changes (development only)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
    )
    p.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="json: one object per line (time, level, logger, task_id, agent_id, message)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve /metrics, /healthz and /readyz on this port (all interfaces)",
    )
    return p


def child_arguments(options: AgentOptions, settings: BusSettings) -> list[str]:
    """The flags a ``--reload`` child is started with (all but ``--reload``).

    Its bus settings (the broker URL, the prefix, TLS files and passwords,
    however they were given) go through the environment the child inherits,
    as ``ORCHESTRATOR_*``: not on its command line, where ``ps`` would show
    a password."""
    os.environ.update(settings_environment(settings))
    args = ["--log-level", options.log_level, "--log-format", options.log_format]
    flags = (
        ("--id", options.agent_id),
        ("--concurrency", options.concurrency),
        ("--metrics-port", options.metrics_port),
    )
    for flag, value in flags:
        if value is not None:
            args += [flag, str(value)]
    return args


def settings_environment(settings: BusSettings) -> dict[str, str]:
    """The ``ORCHESTRATOR_*`` variables that give ``settings`` where they differ
    from the defaults."""
    environment = {}
    for name, field in BusSettings.model_fields.items():
        value = getattr(settings, name)
        if value is None or value == field.default:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        environment[f"ORCHESTRATOR_{name.upper()}"] = str(value)
    return environment


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # a usage error exits 2 here
    setup_agent_logging(args.log_level, args.log_format)
    options = AgentOptions(
        spec=args.agent,
        agent_id=args.agent_id,
        concurrency=args.concurrency,
        reload=args.reload,
        log_level=args.log_level,
        log_format=args.log_format,
        metrics_port=args.metrics_port,
    )
    try:
        refuse_password_in_argv(args.broker)
        overrides = {k: v for k, v in (("broker_url", args.broker), ("prefix", args.prefix)) if v}
        settings = BusSettings(**overrides)
        run_agent(options, settings, lambda agent: event_loop.run(_serve(agent, settings, options)))
    except KeyboardInterrupt:
        return EXIT_OK
    except ValidationError as exc:  # a bad --broker, --prefix or ORCHESTRATOR_* value
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        option = {"broker_url": "--broker", "prefix": "--prefix"}.get(field, field)
        return _fail(f"{option}: {str(first['msg']).removeprefix('Value error, ')}", EXIT_BAD_INPUT)
    except ConnectionError as exc:
        return _fail(exc, EXIT_UNREACHABLE)
    except (ValueError, BusError) as exc:
        return _fail(exc, EXIT_BAD_INPUT)
    return EXIT_OK


@dataclasses.dataclass(frozen=True)
class AgentOptions:
    """The flags of both entry points but the broker's (those are ``BusSettings``)."""

    spec: str
    agent_id: str | None = None
    concurrency: int | None = None
    reload: bool = False
    log_level: str = "info"
    log_format: str = "text"
    metrics_port: int | None = None


def run_agent(
    options: AgentOptions, settings: BusSettings, serve: Callable[[Agent], object]
) -> None:
    """What both entry points do with their flags, once parsed and logging set up.

    Bad input (a bad ``--id`` or ``--concurrency``, a spec that names no
    Agent, code that fails to import or to build it) is a ``ValueError``
    saying so in one line, before anything connects; ``--reload`` runs the
    agent in a child instead (until SIGTERM or Ctrl-C); otherwise the loaded
    and configured agent is handed to ``serve``, the entry point's own way of
    running it until it stops.
    """
    if options.concurrency is not None and options.concurrency < 1:
        raise ValueError(f"--concurrency: must be at least 1, got {options.concurrency}")
    sys.path.insert(0, os.getcwd())  # modules beside the user, as `python -m` would
    try:
        if options.reload:
            run_with_reload(options.spec, child_arguments(options, settings))
            return
        agent = configure(
            _load(options.spec), agent_id=options.agent_id, concurrency=options.concurrency
        )
    except ImportError as exc:
        raise ValueError(
            f"agent: cannot import {options.spec.partition(':')[0]!r}: {exc}"
        ) from None
    serve(agent)


def _load(spec: str) -> Agent:
    try:
        return load_agent(spec)
    except (ImportError, ValueError):
        raise
    except Exception as exc:  # the user's code failed while building the agent
        raise ValueError(f"agent: {spec} failed: {type(exc).__name__}: {exc}") from None


def refuse_password_in_argv(url: str | None) -> None:
    """A password in ``--broker`` is readable by every user of the machine (``ps``):
    refused, naming the safer settings (``orchestrator agent run`` moves it out
    of ``ps`` instead; this entry point does not import the command line). A
    password that is the user name (``guest:guest``) is shown by the user name anyway."""
    try:
        parts = urlsplit(url) if url else None
        password, username = (parts.password, parts.username) if parts else (None, None)
    except ValueError:
        return  # not a URL: the settings say so, naming --broker
    if password and password != username:
        raise ValueError(
            "--broker: a password on the command line can be read by every user of this"
            " machine (ps); give the URL without it and the password in"
            " ORCHESTRATOR_BROKER_PASSWORD_FILE or ORCHESTRATOR_BROKER_PASSWORD"
        )


def setup_agent_logging(level: str, log_format: str) -> None:
    """Logs on stderr, as text or one JSON object per line; each record names its task."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


async def _serve(agent: Agent, settings: BusSettings, options: AgentOptions) -> None:
    """Serve until a graceful stop; a signal while connecting ends it at once."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Agent.serve installs its own once started
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, task.cancel)
    try:
        await serve_agent(agent, settings, options.metrics_port)
    except asyncio.CancelledError:
        return


async def serve_agent(
    agent: Agent,
    settings: BusSettings,
    metrics_port: int | None,
    connecting: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
) -> None:
    """Connect, serve ``--metrics-port`` if given, and ``agent`` until it stops.

    ``connecting`` is the context the connect runs in (default: the transport
    libraries' own logs silenced, since the bus says in one error why it
    cannot connect).
    """
    bus = RabbitMQBus(settings=settings, connection_name=f"agent:{agent.agent_id}")
    try:
        with (connecting or _transport_quiet)():
            await bus.connect()
        async with serving_metrics(agent, bus, metrics_port):
            await agent.serve(bus)
    finally:
        await bus.close()


@contextlib.contextmanager
def _transport_quiet():
    loggers = [logging.getLogger(name) for name in ("aiormq", "aio_pika")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _fail(message: object, code: int) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return code
