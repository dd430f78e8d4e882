"""``agent run`` and ``demo``: the commands that run agents.

They are the entry points that may import the ``agents`` package beside the
orchestrator (the two packages never import each other), and they import it
only when they run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from broker import BusSettings

from .connection import run
from .errors import CliError
from .logs import LogFormat, LogFormatOption, log_filter, setup_logging
from .redaction import out_of_ps, remember_secret, restore_password
from .settings import Broker, LogLevel, LogLevelName, MetricsPort, Prefix, read_settings


def agent_run(
    spec: Annotated[
        str,
        typer.Argument(
            metavar="MODULE:OBJECT",
            help="An Agent in your code, or a function returning one (my_agents:agent).",
        ),
    ],
    agent_id: Annotated[
        str | None,
        typer.Option(
            "--id",
            metavar="ID",
            help="The agent's id, instead of the one in the code: one per process.",
            show_default=False,
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Tasks it runs at once (max_concurrent_tasks), instead of the code's.",
            show_default=False,
        ),
    ] = None,
    reload: Annotated[
        bool,
        typer.Option(
            "--reload",
            help="Restart the agent when a .py file under its module's folder changes"
            " (development only).",
        ),
    ] = False,
    broker: Broker = None,
    prefix: Prefix = None,
    log_level: LogLevel = LogLevelName.info,
    log_format: LogFormatOption = LogFormat.text,
    metrics_port: MetricsPort = None,
) -> None:
    """Run an agent until SIGTERM or Ctrl-C; running tasks finish first."""
    setup_logging(log_level, log_format)
    settings, _ = read_settings(broker, prefix)
    # An entry point that runs agents: the one place besides demo that imports both.
    from agents.runner import AgentOptions, run_agent, serve_agent

    options = AgentOptions(
        spec=spec,
        agent_id=agent_id,
        concurrency=concurrency,
        reload=reload,
        log_level=log_level.value,
        log_format=log_format.value,
        metrics_port=metrics_port,
    )

    def serve(agent: Any) -> None:
        # A signal while it connects ends it at once; then the agent's own graceful stop.
        run(serve_agent(agent, settings, metrics_port, _transport_logs_after), ends_by_signal=True)

    try:
        run_agent(options, settings, serve)  # bad input: a ValueError, exit 1
    except KeyboardInterrupt:
        if not reload:
            raise
        # --reload: Ctrl-C stops the child and ends the command, as a graceful stop


@contextlib.contextmanager
def _transport_logs_after() -> Iterator[None]:
    """The transport's own logs are kept quiet until the bus has connected."""
    yield
    log_filter.transport_quiet = False


def demo(
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            "-b",
            metavar="URL",
            help="amqp:// URL of RabbitMQ; default: everything in this process.",
            show_default=False,
            callback=out_of_ps,  # a password in it is warned about and kept out of ps
        ),
    ] = None,
    workflows: Annotated[int, typer.Option(metavar="N", help="How many workflows to run.")] = 3,
    prefix: Annotated[
        str | None,
        typer.Option(
            "--prefix",
            metavar="PREFIX",
            help="With --broker: run under this prefix and keep its queues, so that"
            " 'orchestrator watch --prefix PREFIX' and the management UI can follow it."
            " Default: a fresh prefix, deleted at the end.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the seed's trading workflow with example agents; ends with a summary."""
    broker = restore_password(broker) if broker else broker
    remember_secret(broker)
    if prefix is not None and not broker:
        raise CliError("--prefix: only with --broker (in-process there is nothing to follow)")
    BusSettings(broker_url=broker, prefix=prefix or "demo")  # bad input: before anything runs
    # An entry point that runs agents: it may import both packages.
    from ..demo import run_demo

    result = run(run_demo(broker, workflows, prefix))
    assert result is not None
    if result["tasks_failed"]:
        raise CliError(f"{result['tasks_failed']} of {result['tasks_created']} tasks failed")
