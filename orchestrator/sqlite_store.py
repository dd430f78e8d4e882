"""Task and agent records in a SQLite file, so that a restarted orchestrator
carries on where the last one stopped.

A write-behind journal (``journal.JournalStore``): reads come from memory,
``flush`` writes every change in one transaction. The file is in WAL mode
with ``synchronous=NORMAL``: a commit survives the process being killed;
only a power cut may lose the last commits. Pass ``synchronous="FULL"``
where that matters more than write speed.

Every write transaction is ``BEGIN IMMEDIATE``: it takes the file's write
lock before it reads the leader epoch, so a claim by another process (a
standby taking over) cannot slip in between the epoch check and the write.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite

from .journal import Batch, JournalStore, Loaded
from .store_sql import changes, newer_schema

SCHEMA_VERSION = 3
"""Kept in ``PRAGMA user_version``; a file from a newer version is refused.
1: tasks, agents. 2: meta (the statistics of forgotten tasks). 3: leader (the epoch)."""

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        "CREATE TABLE IF NOT EXISTS tasks ("
        " task_id TEXT PRIMARY KEY, status TEXT NOT NULL, record TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS agents (agent_id TEXT PRIMARY KEY, record TEXT NOT NULL)",
    ],
    2: ["CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"],
    3: [
        "CREATE TABLE IF NOT EXISTS leader (id INTEGER PRIMARY KEY CHECK (id = 1),"
        " epoch INTEGER NOT NULL, holder TEXT, claimed_at REAL)",
        "INSERT OR IGNORE INTO leader (id, epoch) VALUES (1, 0)",
    ],
}
"""The step from version n-1 to n; a new file runs them all, in one transaction."""


class SQLiteStore(JournalStore):
    """``StateStore`` on one SQLite file; one orchestrator writes it (the leader)."""

    def __init__(
        self,
        path: str | Path,
        *,
        flush_interval: float = 0.05,
        synchronous: str = "NORMAL",
    ) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous: expected NORMAL or FULL, got {synchronous!r}")
        super().__init__(flush_interval=flush_interval, retry_for=0.0)
        self.path = Path(path)
        self._synchronous = synchronous.upper()
        self._db: aiosqlite.Connection | None = None
        self._db_lock = asyncio.Lock()
        """One transaction at a time on the one connection (a flush, a claim)."""

    @property
    def where(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------- lifecycle
    async def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await self._prepare(db)
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def _load(self) -> Loaded:
        db = self._db
        assert db is not None
        loaded = Loaded()
        async with self._db_lock:
            await db.execute("BEGIN")  # one snapshot of the three tables
            try:
                async with db.execute("SELECT record FROM tasks") as cursor:
                    loaded.tasks = [text for (text,) in await cursor.fetchall()]
                async with db.execute("SELECT record FROM agents") as cursor:
                    loaded.agents = [text for (text,) in await cursor.fetchall()]
                async with db.execute("SELECT key, value FROM meta") as cursor:
                    loaded.meta = [(key, text) for key, text in await cursor.fetchall()]
            finally:
                await db.execute("COMMIT")
        return loaded

    async def _version(self, db: aiosqlite.Connection) -> int:
        async with db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            raise newer_schema(str(self.path), version, SCHEMA_VERSION)
        return version

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        await self._version(db)  # refused before anything is changed
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(f"PRAGMA synchronous={self._synchronous}")
        async with _immediate(db):  # two processes opening one file: one migrates
            version = await self._version(db)
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    await db.execute(statement)
            if version < SCHEMA_VERSION:
                await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    async def _disconnect(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    # ---------------------------------------------------------------- writes
    async def _transaction(self, batch: Batch, fence: int | None) -> None:
        db = self._db
        assert db is not None
        async with self._db_lock, _immediate(db):
            if fence is not None:
                epoch, holder = await self._epoch_row(db)
                self._fence(fence, epoch, holder)
            await self._apply(db, batch)

    @staticmethod
    async def _apply(db: aiosqlite.Connection, batch: Batch) -> None:
        for table, rows, gone in changes(batch):
            if rows:
                places = ", ".join("?" * len(table.all_columns))
                await db.executemany(table.upsert(f"VALUES ({places})"), rows)
            if gone:
                await db.executemany(
                    f"DELETE FROM {table.name} WHERE {table.key} = ?", [(key,) for key in gone]
                )

    # ---------------------------------------------------------------- fencing
    @staticmethod
    async def _epoch_row(db: aiosqlite.Connection) -> tuple[int, str | None]:
        async with db.execute("SELECT epoch, holder FROM leader WHERE id = 1") as cursor:
            row = await cursor.fetchone()
        return (0, None) if row is None else (int(row[0]), row[1])

    async def _claim(self, holder: str) -> int:
        db = self._db
        assert db is not None
        async with self._db_lock, _immediate(db):
            await db.execute(
                "UPDATE leader SET epoch = epoch + 1, holder = ?, claimed_at = ? WHERE id = 1",
                (holder, time.time()),
            )
            epoch, _ = await self._epoch_row(db)
        return epoch

    async def _read_epoch(self) -> tuple[int, str | None]:
        db = self._db
        assert db is not None
        async with self._db_lock:
            return await self._epoch_row(db)


@contextlib.asynccontextmanager
async def _immediate(db: aiosqlite.Connection) -> AsyncIterator[None]:
    """A write transaction holding the file's write lock from its start (see above):
    committed when the block ends, rolled back when it raises (or is cancelled)."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        yield
        await db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            await db.execute("ROLLBACK")
        raise
