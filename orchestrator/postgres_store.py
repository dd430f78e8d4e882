"""Task and agent records in PostgreSQL (asyncpg): state beyond one machine.

The same write-behind journal as the SQLite store (``journal.JournalStore``):
reads come from memory, a save is a snapshot, ``flush`` writes every change
so far in one transaction. What differs is what a network database needs:

- **Reconnecting.** The connections are an asyncpg pool; a connection that
  broke is replaced on the next write. A flush that fails because the server
  is restarting or unreachable is tried again, with back-off, for up to
  ``retry_for`` seconds (its records stay dirty meanwhile, and what is saved
  in the meantime joins the retry), so an outage of the database delays the
  orchestrator instead of losing its changes.
- **Migrations.** ``schema_version`` lists the migrations applied; opening
  applies the missing ones in order, in one transaction, under a
  transaction-level advisory lock, so that two orchestrators opening one
  database at once migrate it once. A database of a newer schema is refused.
- **Fencing.** The ``leader`` row holds the epoch. A flush of a store object
  that claimed an epoch reads the row ``FOR UPDATE`` in its transaction: a
  claim (an ``UPDATE`` of that row) either waits for the flush to commit or
  makes it see the newer epoch and write nothing.

Records are JSON text (``records_codec``), not ``jsonb``: an agent's result
is untrusted, and ``jsonb`` refuses some JSON that Python writes (NaN, a
``\\u0000`` escape), which would make every later flush fail.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from .journal import Batch, JournalStore, Loaded
from .store_sql import changes, newer_schema

SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "tasks, agents and meta",
        (
            "CREATE TABLE tasks (task_id text PRIMARY KEY, status text NOT NULL,"
            " record text NOT NULL)",
            "CREATE TABLE agents (agent_id text PRIMARY KEY, record text NOT NULL)",
            "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
        ),
    ),
    Migration(
        2,
        "the leader epoch, for fencing",
        (
            "CREATE TABLE leader (id integer PRIMARY KEY CHECK (id = 1),"
            " epoch bigint NOT NULL, holder text, claimed_at timestamptz)",
            "INSERT INTO leader (id, epoch) VALUES (1, 0)",
        ),
    ),
)
"""In order; a migration is never changed once released, only new ones added."""
SCHEMA_VERSION = MIGRATIONS[-1].version

MIGRATION_LOCK = 0x6F726368_73746F72  # "orchstor": the advisory lock key of migrations

_TRANSIENT_CLASSES = ("08", "40", "53", "57")
_BROKEN_CLASSES = ("08", "57")
"""SQLSTATE classes a retry may cure: connection exception, transaction rollback
(serialization, deadlock), insufficient resources, operator intervention
(shutdown, starting up)."""


class PostgresUnavailable(ConnectionError):
    """The store cannot reach its PostgreSQL at open (a bad address, a login refused)."""


def check_url(url: str) -> None:
    """Raise ``ValueError`` saying what is wrong if ``url`` is not a PostgreSQL URL."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"expected postgresql://HOST/DATABASE, got {redact(url)!r}")
    try:
        parts.port  # noqa: B018 - it raises for a port that is not a number
    except ValueError:
        raise ValueError(f"the port of {redact(url)!r} is not a number") from None
    if not parts.hostname and "host=" not in parts.query:
        raise ValueError(f"no host in {redact(url)!r}")


def redact(url: str) -> str:
    """The URL without its password (in the address or as ``?password=``)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = urlencode(
        [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query)], safe="*/"
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


class PostgresStore(JournalStore):
    """``StateStore`` in one PostgreSQL database; one orchestrator (the leader) writes it."""

    def __init__(
        self,
        url: str,
        *,
        flush_interval: float = 0.05,
        retry_for: float = 60.0,
        connect_timeout: float = 5.0,
        command_timeout: float = 15.0,
    ) -> None:
        try:
            check_url(url)
        except ValueError as exc:
            raise ValueError(f"url: {exc}") from None
        super().__init__(flush_interval=flush_interval, retry_for=retry_for)
        self.url = url
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None

    @property
    def where(self) -> str:
        return redact(self.url)

    @property
    def path(self) -> str:
        """The same as ``where``: what ``orchestrator serve`` names in its messages."""
        return self.where

    def _host(self) -> str:
        parts = urlsplit(self.url)
        return parts.netloc.rpartition("@")[2] or "the default host"

    # ------------------------------------------------------------- lifecycle
    async def _connect(self) -> None:
        # No connection floor (min_size 0): asyncpg (0.32) keeps a floor by
        # reconnecting in the background, logging a traceback a second while
        # the server restarts; here the next write's acquire connects instead,
        # and ``_write`` tries it again. Idle connections are kept (lifetime 0).
        pool = await asyncpg.create_pool(
            self.url,
            min_size=0,
            max_size=3,
            max_inactive_connection_lifetime=0,
            timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
            server_settings={"application_name": "orchestrator"},
        )
        try:
            try:
                con = await pool.acquire(timeout=self.connect_timeout)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise self._unavailable(exc) from None
            try:
                await self._migrate(con)
            finally:
                await pool.release(con)
        except BaseException as exc:
            await _close_pool(pool)
            if isinstance(exc, asyncpg.PostgresError):  # a schema it may not create in...
                raise RuntimeError(f"cannot prepare the tables: {exc}") from exc
            raise
        self._pool = pool

    def _unavailable(self, exc: Exception) -> PostgresUnavailable:
        """What opening says when its first connection failed with ``exc``."""
        if isinstance(exc, TimeoutError):
            return PostgresUnavailable(
                f"no answer from PostgreSQL at {self._host()} within {self.connect_timeout:g}s"
            )
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            return PostgresUnavailable(f"no PostgreSQL answers at {self._host()} ({reason})")
        return PostgresUnavailable(f"PostgreSQL at {self._host()} refused: {exc}")

    async def _load(self) -> Loaded:
        async with self._connection() as con:
            async with con.transaction(isolation="repeatable_read", readonly=True):
                return Loaded(
                    tasks=[r[0] for r in await con.fetch("SELECT record FROM tasks")],
                    agents=[r[0] for r in await con.fetch("SELECT record FROM agents")],
                    meta=[(r[0], r[1]) for r in await con.fetch("SELECT key, value FROM meta")],
                )

    async def _migrate(self, con: asyncpg.Connection) -> None:
        async with con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await con.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY,"
                " description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            version = await con.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
            if version > SCHEMA_VERSION:
                raise newer_schema(self.where, version, SCHEMA_VERSION)
            for migration in MIGRATIONS:
                if migration.version <= version:
                    continue
                for statement in migration.statements:
                    await con.execute(statement)
                await con.execute(
                    "INSERT INTO schema_version (version, description) VALUES ($1, $2)",
                    migration.version,
                    migration.description,
                )

    async def _disconnect(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await _close_pool(pool)

    def _transient(self, exc: Exception) -> bool:
        return _broken(exc) or (
            isinstance(exc, asyncpg.PostgresError)
            and (getattr(exc, "sqlstate", None) or "")[:2] in _TRANSIENT_CLASSES
        )

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of the pool; one that broke under it is terminated, not
        given back: asyncpg may keep a connection the server ended mid-query in
        a state where its next query raises ``InternalClientError`` ("cannot
        switch to state 15; another operation (2) is in progress")."""
        if self._pool is None:
            raise RuntimeError(f"the store on {self.where} is not open")
        async with self._pool.acquire(timeout=self.connect_timeout) as con:
            try:
                yield con
            except Exception as exc:
                if _broken(exc):
                    # (one the pool already let go of, as it does once it
                    # saw the connection close, is not ours to end)
                    with contextlib.suppress(asyncpg.InterfaceError):
                        con.terminate()
                raise

    # ---------------------------------------------------------------- writes
    async def _transaction(self, batch: Batch, fence: int | None) -> None:
        async with self._connection() as con, con.transaction():
            if fence is not None:
                row = await con.fetchrow("SELECT epoch, holder FROM leader WHERE id = 1 FOR UPDATE")
                self._fence(fence, int(row["epoch"]), row["holder"])
            for table, rows, gone in changes(batch):
                if rows:  # one statement: each column an array, unnest makes them rows
                    columns = list(zip(*rows, strict=True))
                    arrays = ", ".join(f"${n}::text[]" for n in range(1, len(columns) + 1))
                    await con.execute(table.upsert(f"SELECT * FROM unnest({arrays})"), *columns)
                if gone:
                    await con.execute(
                        f"DELETE FROM {table.name} WHERE {table.key} = ANY($1::text[])", list(gone)
                    )

    # ---------------------------------------------------------------- fencing
    async def _claim(self, holder: str) -> int:
        async with self._connection() as con:
            return int(
                await con.fetchval(
                    "UPDATE leader SET epoch = epoch + 1, holder = $1, claimed_at = now()"
                    " WHERE id = 1 RETURNING epoch",
                    holder,
                )
            )

    async def _read_epoch(self) -> tuple[int, str | None]:
        async with self._connection() as con:
            row = await con.fetchrow("SELECT epoch, holder FROM leader WHERE id = 1")
        return int(row["epoch"]), row["holder"]


def _broken(exc: Exception) -> bool:
    """Whether ``exc`` says the connection is gone or unusable (connection
    exception, operator intervention: the server shutting down or starting)."""
    if isinstance(
        exc, OSError | TimeoutError | asyncpg.InterfaceError | asyncpg.InternalClientError
    ):
        return True
    state = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and state[:2] in _BROKEN_CLASSES


async def _close_pool(pool: asyncpg.Pool) -> None:
    """Close the pool, or cut its connections if the server does not answer."""
    try:
        await asyncio.wait_for(pool.close(), 5)
    except Exception:
        pool.terminate()
