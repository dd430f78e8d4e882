"""``serve``: the orchestrator as a process, answering requests until a signal stops it.

A signal ends it gracefully: the service stops consuming and the store is
closed, so that ``serve`` started again on the same store goes on from there.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

import typer

from broker import BusSettings, RabbitMQBus, redact_url

from .connection import stop_on_signals
from .errors import CliError
from .logs import log_filter, setup_logging
from .settings import Broker, LogLevel, LogLevelName, Prefix, read_settings

log = logging.getLogger("orchestrator.cli")  # the command line's one logger name


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
    setup_logging(log_level)
    settings, cli_settings = read_settings(broker, prefix)
    state = open_store(store if store is not None else cli_settings.store)
    asyncio.run(_serve(settings, state))


def open_store(spec: str) -> Any:
    """The ``StateStore`` a ``--store`` value names (None: the orchestrator's memory store)."""
    kind, _, path = spec.partition(":")
    if spec == "memory":
        return None
    if kind == "sqlite" and path:
        from ..sqlite_store import SQLiteStore

        return SQLiteStore(path)
    raise CliError(f"--store: expected 'memory' or 'sqlite:PATH', got {spec!r}")


async def _serve(settings: BusSettings, store: Any) -> None:
    from ..service import OrchestratorService
    from ..task_orchestrator import TaskOrchestrator

    bus = RabbitMQBus(settings=settings, connection_name=f"{settings.prefix}:orchestrator")
    orchestrator = TaskOrchestrator(bus, store=store)
    service = OrchestratorService(orchestrator)
    stop = stop_on_signals()
    try:
        await orchestrator.start()
    except BaseException:
        await orchestrator.store.close()
        raise
    log_filter.transport_quiet = False
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
