"""``serve``: the orchestrator as a process, answering requests until a signal stops it.

The store is opened first, so that a store it cannot use is one line and
exit 1 before anything connects; then the orchestrator connects and serves.
A signal ends it at any stage within about two seconds: while connecting it
just gives up; once serving, the service stops consuming and the store is
closed, so that ``serve`` started again on the same store goes on from there.
"""

from __future__ import annotations

import logging
import sqlite3
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from broker import BusSettings, RabbitMQBus, redact_url

from .connection import run, stop_on_signals
from .errors import CliError
from .logs import log_filter, setup_logging
from .settings import Broker, LogLevel, LogLevelName, Prefix, read_settings

log = logging.getLogger("orchestrator.cli")  # the command line's one logger name

SQLITE_HEADER = b"SQLite format 3\x00"


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
    spec = store if store is not None else cli_settings.store
    setting = "--store" if store is not None else f"ORCHESTRATOR_STORE={spec!r}"
    state = open_store(spec, setting)
    run(_serve(settings, state, setting), ends_by_signal=True)


def open_store(spec: str, setting: str = "--store") -> Any:
    """The ``StateStore`` a ``--store`` value names (None: the orchestrator's memory store).

    A SQLite path that cannot hold a store (a folder, a file that is not
    SQLite, a folder or file that cannot be written) is a ``CliError`` naming
    ``setting``; nothing is created yet.
    """
    kind, _, path = spec.partition(":")
    if spec == "memory":
        return None
    if kind == "sqlite" and path:
        from ..sqlite_store import SQLiteStore

        check_sqlite_path(Path(path), setting)
        return SQLiteStore(path)
    raise CliError(f"{setting}: expected 'memory' or 'sqlite:PATH', got {spec!r}")


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


async def _serve(settings: BusSettings, store: Any, setting: str) -> None:
    from ..service import OrchestratorService
    from ..task_orchestrator import TaskOrchestrator

    if store is not None:
        await _open(store, setting)
    bus = RabbitMQBus(settings=settings, connection_name=f"{settings.prefix}:orchestrator")
    orchestrator = TaskOrchestrator(bus, store=store)
    service = OrchestratorService(orchestrator)
    try:
        await orchestrator.start()
    except BaseException:  # a failed connect, or a signal while connecting
        await bus.close()
        await orchestrator.store.close()
        raise
    stop = stop_on_signals()
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
