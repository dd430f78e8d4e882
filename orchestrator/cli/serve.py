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
            help="Where task records live: memory, sqlite:PATH or postgresql://HOST/DATABASE."
            " Env: ORCHESTRATOR_STORE.",
            show_default=False,
        ),
    ] = None,
    log_level: LogLevel = LogLevelName.info,
) -> None:
    """Run the orchestrator and answer requests on <prefix>.rpc until SIGTERM or Ctrl-C."""
    setup_logging(log_level)
    settings, cli_settings = read_settings(broker, prefix)
    spec = store if store is not None else cli_settings.store
    setting = "--store" if store is not None else f"ORCHESTRATOR_STORE={redact_url(spec)!r}"
    open_store(spec, setting)  # a bad value is refused before anything starts
    run(_serve(settings, lambda: open_store(spec, setting), setting), ends_by_signal=True)


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


async def _serve(settings: BusSettings, make_store: Callable[[], Any], setting: str) -> None:
    """Lead the prefix, or stand by while another orchestrator leads it, until a signal.

    A standby opens its store only when it takes over (a store read earlier
    would be stale by then); the store is checked once at the start all the
    same, so that a store it cannot use is an error before anything connects.
    An orchestrator that steps down (it lost the lease, or a newer leader
    fenced its store) is replaced by a fresh one that stands by.
    """
    from ..service import OrchestratorService
    from ..task_orchestrator import TaskOrchestrator

    probe = make_store()
    if probe is not None:
        await _open(probe, setting)
        await probe.close()
    bus = await _connected(settings)
    stop = stop_on_signals()
    log_filter.transport_quiet = False
    try:
        while not stop.is_set():
            orchestrator = TaskOrchestrator(bus, store=make_store())
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
        await bus.close()


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
