"""``serve``: the orchestrator as a process, answering requests until a signal stops it.

The store is opened first, so that a store it cannot use is one line and
exit 1 before anything connects; then the orchestrator connects and serves.
A signal ends it at any stage within about two seconds: while connecting it
just gives up; once serving, the service stops consuming and the store is
closed, so that ``serve`` started again on the same store goes on from there.
While another orchestrator leads the prefix it stands by, and takes over
when that one goes (``orchestrator.leadership``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from broker import BusSettings, RabbitMQBus, redact_url

from .connection import run, stop_on_signals
from .errors import CliError
from .logs import LogFormat, LogFormatOption, log_filter, setup_logging
from .settings import Broker, LogLevel, LogLevelName, MetricsPort, Prefix, read_settings

if TYPE_CHECKING:  # imported where used: no other command needs the orchestrator's modules
    from broker.probes import ProbeServer

    from ..settings import OrchestratorSettings

log = logging.getLogger("orchestrator.cli")  # the command line's one logger name

SQLITE_HEADER = b"SQLite format 3\x00"


def serve(
    broker: Broker = None,
    prefix: Prefix = None,
    store: Annotated[
        str | None,
        typer.Option(
            metavar="STORE",
            help="Where task records live: memory, sqlite:PATH or postgresql://HOST/DATABASE."
            " Env: ORCHESTRATOR_STORE.",
            show_default=False,
        ),
    ] = None,
    log_level: LogLevel = LogLevelName.info,
    log_format: LogFormatOption = LogFormat.text,
    metrics_port: MetricsPort = None,
) -> None:
    """Run the orchestrator and answer requests on <prefix>.rpc until SIGTERM or Ctrl-C."""
    from ..settings import OrchestratorSettings

    setup_logging(log_level, log_format)
    settings, cli_settings = read_settings(broker, prefix)
    spec = store if store is not None else cli_settings.store
    setting = "--store" if store is not None else f"ORCHESTRATOR_STORE={redact_url(spec)!r}"
    open_store(spec, setting)  # a bad value is refused before anything starts
    # Read now, so that a bad ORCHESTRATOR_* value is refused before anything connects.
    # A serve that loses its lease stands by again, fresh (see _serve), rather than
    # leading on with the state it held through the outage.
    orchestrator_settings = OrchestratorSettings(reclaim_lease=False)
    run(
        _serve(
            settings,
            lambda: open_store(spec, setting),
            setting,
            metrics_port,
            orchestrator_settings,
        ),
        ends_by_signal=True,
    )


def open_store(spec: str, setting: str = "--store") -> Any:
    """The ``StateStore`` a ``--store`` value names (None: the orchestrator's memory store).

    A SQLite path that cannot hold a store (a folder, a file that is not
    SQLite, a folder or file that cannot be written), or a PostgreSQL URL that
    is not one, is a ``CliError`` naming ``setting``; nothing is created yet.
    """
    kind, _, path = spec.partition(":")
    if spec == "memory":
        return None
    if kind == "sqlite" and path:
        from ..sqlite_store import SQLiteStore

        check_sqlite_path(Path(path), setting)
        return SQLiteStore(path)
    if spec.startswith(("postgresql://", "postgres://")):
        from ..postgres_store import PostgresStore, check_url

        try:  # reachability is tried when it opens, before the broker
            check_url(spec)
        except ValueError as exc:
            raise CliError(f"{setting}: {exc}") from None
        return PostgresStore(spec)
    raise CliError(
        f"{setting}: expected 'memory' or 'sqlite:PATH' or 'postgresql://HOST/DATABASE',"
        f" got {redact_url(spec)!r}"
    )


def check_sqlite_path(path: Path, setting: str) -> None:
    """Refuse, naming ``setting``, a path where a SQLite store cannot live.

    It tries what the store will do (write the file, create files beside it
    for the write-ahead log) and leaves nothing behind.
    """
    shown = str(path)
    if path.is_dir():
        raise CliError(
            f"{setting}: {shown!r} is a folder; name a file in it, such as"
            f" {str(path / 'state.db')!r}"
        )
    if path.exists():
        try:
            with path.open("r+b") as file:  # for writing, without changing it
                header = file.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise CliError(f"{setting}: cannot write {shown!r}: {exc.strerror or exc}") from None
        if header and header != SQLITE_HEADER:
            raise CliError(f"{setting}: {shown!r} is not a SQLite database")
    folder = _existing_folder(path.parent)
    if not folder.is_dir():
        raise CliError(f"{setting}: {str(folder)!r} is a file, not a folder")
    try:  # SQLite writes its -wal and -shm files beside the store
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".orchestrator-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CliError(
            f"{setting}: cannot create a file in folder {str(folder)!r}: {reason}"
        ) from None


def _existing_folder(folder: Path) -> Path:
    """``folder``, or its nearest parent that exists (the store creates the rest)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


async def _open(store: Any, setting: str) -> None:
    """Open the store (read its records) before connecting; its failures as one line."""
    try:
        await store.open()
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        await store.close()
        path = str(store.path)
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) != path:
            problem = f"cannot create folder {str(exc.filename)!r}: {exc.strerror or exc}"
        elif isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
            problem = f"{path!r} is not a SQLite database"
        else:
            problem = f"cannot open {path!r}: {getattr(exc, 'strerror', None) or exc}"
        raise CliError(f"{setting}: {problem}") from None


async def _serve(
    settings: BusSettings,
    make_store: Callable[[], Any],
    setting: str,
    metrics_port: int | None = None,
    orchestrator_settings: OrchestratorSettings | None = None,
) -> None:
    """Lead the prefix, or stand by while another orchestrator leads it, until a signal.

    A standby reads its store's records only when it takes over (records read
    earlier would be stale by then; it reads only the epoch row, to name the
    leader); the store is checked once at the start all the same, so that a
    store it cannot use is an error before anything connects.
    An orchestrator that steps down (it lost the lease, or a newer leader
    fenced its store) is replaced by a fresh one that stands by.
    """
    from ..service import OrchestratorService
    from ..settings import OrchestratorSettings
    from ..task_orchestrator import TaskOrchestrator

    probe = make_store()
    if probe is not None:
        await _open(probe, setting)
        await probe.close()
    bus = await _connected(settings)
    stop = stop_on_signals()
    log_filter.transport_quiet = False
    probes = _Probes(metrics_port)
    await probes.start()
    try:
        while not stop.is_set():
            orchestrator = TaskOrchestrator(
                bus,
                settings=orchestrator_settings or OrchestratorSettings(reclaim_lease=False),
                store=make_store(),
            )
            probes.follow(orchestrator, bus)
            service = OrchestratorService(orchestrator)
            leadership = orchestrator.leadership
            try:
                await orchestrator.start()
                await service.start()
                if await _first(stop.wait(), leadership.wait_leading()) == 1:
                    log.info(
                        "serving prefix %r on %s; requests on %s (leader %s, epoch %s)",
                        settings.prefix,
                        redact_url(settings.broker_url or ""),
                        bus.topology.rpc_queue,
                        *leadership.leader_pair,
                    )
                    await _first(stop.wait(), leadership.stepped_down.wait())
            finally:
                await service.stop()
                await orchestrator.stop()
            if not stop.is_set():
                # A new connection too: the old one, if it was lost meanwhile, would
                # restore the consumers of the closed subscriptions on reconnecting.
                await bus.close()
                log.info("stepped down; standing by again with a fresh orchestrator")
                bus = await _connected(settings)
        log.info("stopping")
    finally:
        await probes.stop()
        await bus.close()


class _Probes:
    """``--metrics-port``: one endpoint for the process, following whichever
    orchestrator object serves (a new one after each step-down). Ready while
    connected and leading or standing by: a standby is ready, it is what takes
    over; counters from lifecycle moves go on across step-downs."""

    def __init__(self, port: int | None) -> None:
        from ..metrics import OrchestratorMetrics

        self.port = port
        self.metrics = OrchestratorMetrics() if port is not None else None
        self.server: ProbeServer | None = None
        self.orchestrator: Any = None
        self.bus: RabbitMQBus | None = None

    def follow(self, orchestrator: Any, bus: RabbitMQBus) -> None:
        self.orchestrator, self.bus = orchestrator, bus
        if self.metrics is not None:
            orchestrator.lifecycle.observe(self.metrics)

    def ready(self) -> tuple[bool, str]:
        if self.bus is None or not self.bus.is_connected:
            return False, "not connected to the broker"
        if self.orchestrator is None:
            return False, "starting"
        role = "leading" if self.orchestrator.leadership.is_leader else "standing by"
        return True, f"{role} on prefix {self.bus.settings.prefix!r}"

    async def stats(self) -> dict[str, Any]:
        return await self.orchestrator.get_stats() if self.orchestrator is not None else {}

    async def start(self) -> None:
        if self.metrics is None:
            return
        from broker.probes import ProbeServer

        self.server = ProbeServer(
            self.metrics.registry,
            ready=self.ready,
            refresh=self.metrics.refresher(self.stats),
            host="0.0.0.0",
            port=self.port or 0,
        )
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()


async def _connected(settings: BusSettings) -> RabbitMQBus:
    bus = RabbitMQBus(settings=settings, connection_name=f"{settings.prefix}:orchestrator")
    try:
        await bus.connect()
    except BaseException:  # a failed connect, or a signal while connecting
        await bus.close()
        raise
    return bus


async def _first(*waits: Coroutine[Any, Any, Any]) -> int:
    """Wait until one of ``waits`` ends; its index (the others are cancelled)."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return next(i for i, task in enumerate(tasks) if task in done)
