"""Task and agent records in a SQLite file, so that a restarted orchestrator
carries on where the last one stopped.

Reads never touch the disk: every record saved lives in memory as a
snapshot, as in ``MemoryStore``, and the file is the write-ahead copy. Writes are batched:
``save_task`` marks a record dirty and ``flush`` writes every dirty record in
one transaction. The orchestrator flushes before it publishes a task and
before it acknowledges the events it handled, so nothing the broker forgets
is missing from the file; a background flush covers the rest (agent
heartbeats, progress) within ``flush_interval``.

The file is in WAL mode with ``synchronous=NORMAL``: a commit survives the
process being killed; only a power cut may lose the last commits. Pass
``synchronous="FULL"`` where that matters more than write speed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiosqlite

from .models import AgentCapability, Delivery, Task, TaskPriority, TaskStatus
from .store import StateStore, snapshot_agent, snapshot_task

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"""Kept in ``PRAGMA user_version``; a file from a newer version is refused.
1: tasks, agents. 2: meta (the statistics of forgotten tasks)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    status  TEXT NOT NULL,
    record  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY,
    record   TEXT NOT NULL
);
"""

_MIGRATIONS = {
    2: "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
}
"""The step from version n-1 to n; a new file runs them all."""


def task_to_record(task: Task) -> str:
    return json.dumps(
        {
            "task_id": task.task_id,
            "name": task.name,
            "description": task.description,
            "task_type": task.task_type,
            "priority": task.priority.value,
            "payload": task.payload,
            "dependencies": task.dependencies,
            "required_capabilities": task.required_capabilities,
            "estimated_duration": task.estimated_duration,
            "max_retries": task.max_retries,
            "timeout": task.timeout,
            "status": task.status.value,
            "assigned_agent": task.assigned_agent,
            "created_at": task.created_at,
            "started_at": task.started_at,
            "completed_at": task.completed_at,
            "retry_count": task.retry_count,
            "result": task.result,
            "error_message": task.error_message,
            "attempt": task.attempt,
            "progress": task.progress,
            "retry_due": task.retry_due,
            "delivery": task.delivery.value,
            "traceback": task.traceback,
            "idempotency_key": task.idempotency_key,
        },
        separators=(",", ":"),
    )


def task_from_record(text: str) -> Task:
    data: dict[str, Any] = json.loads(text)
    data["priority"] = TaskPriority(data["priority"])
    data["status"] = TaskStatus(data["status"])
    if "delivery" not in data:
        # Written before the delivery field, when "assigned" meant queued.
        data["delivery"] = Delivery.NONE
        if data["status"] is TaskStatus.ASSIGNED and data.get("assigned_agent") is None:
            data["status"] = TaskStatus.PENDING
    else:
        data["delivery"] = Delivery(data["delivery"])
    return Task(**data)


def agent_to_record(agent: AgentCapability) -> str:
    return json.dumps(
        {
            "agent_id": agent.agent_id,
            "capabilities": agent.capabilities,
            "performance_score": agent.performance_score,
            "max_concurrent_tasks": agent.max_concurrent_tasks,
            "specialization_score": agent.specialization_score,
            "task_types": agent.task_types,
            "last_seen": agent.last_seen,
        },
        separators=(",", ":"),
    )


def agent_from_record(text: str) -> AgentCapability:
    """An agent as last saved; the orchestrator recounts its running tasks from theirs."""
    return AgentCapability(**json.loads(text))


class SQLiteStore(StateStore):
    """``StateStore`` on one SQLite file; one orchestrator per file."""

    durable = True

    def __init__(
        self,
        path: str | Path,
        *,
        flush_interval: float = 0.05,
        synchronous: str = "NORMAL",
    ) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous: expected NORMAL or FULL, got {synchronous!r}")
        self.path = Path(path)
        self.flush_interval = flush_interval
        self._synchronous = synchronous.upper()
        self._db: aiosqlite.Connection | None = None
        self._opening: asyncio.Lock | None = None
        self._flush_lock: asyncio.Lock | None = None
        self._tasks: dict[str, Task] = {}
        self._agents: dict[str, AgentCapability] = {}
        self._meta: dict[str, Any] = {}
        self._dirty_meta: set[str] = set()
        # Ids whose record changed (written) or went away (deleted) since the last flush.
        self._dirty_tasks: set[str] = set()
        self._dirty_agents: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._writing: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------- lifecycle
    async def open(self) -> None:
        """Open (or create) the file and read every record; idempotent."""
        if self._db is not None:
            return
        if self._closed:
            raise RuntimeError(f"the store on {self.path} is closed")
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._db is not None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, isolation_level=None)
            try:
                await self._prepare(db)
                async with db.execute("SELECT record FROM tasks") as cursor:
                    for (text,) in await cursor.fetchall():
                        task = task_from_record(text)
                        self._tasks[task.task_id] = task
                async with db.execute("SELECT record FROM agents") as cursor:
                    for (text,) in await cursor.fetchall():
                        agent = agent_from_record(text)
                        self._agents[agent.agent_id] = agent
                async with db.execute("SELECT key, value FROM meta") as cursor:
                    for key, text in await cursor.fetchall():
                        self._meta[key] = json.loads(text)
            except BaseException:
                await db.close()
                raise
            self._db = db
            self._flush_lock = asyncio.Lock()
            self._wake = asyncio.Event()
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())
            log.info(
                "state store %s: %d task(s), %d agent(s)",
                self.path,
                len(self._tasks),
                len(self._agents),
            )

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        async with db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} holds state of schema version {version}; "
                f"this orchestrator reads up to version {SCHEMA_VERSION}: upgrade it"
            )
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(f"PRAGMA synchronous={self._synchronous}")
        await db.executescript(_SCHEMA)
        for step in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
            await db.executescript(_MIGRATIONS[step])
        if version < SCHEMA_VERSION:
            await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    async def close(self) -> None:
        """Write what is pending and close the file."""
        if self._db is None:
            self._closed = True
            return
        if self._flusher is not None and self._flush_lock is not None:
            async with self._flush_lock:  # never cancel it in the middle of a write
                self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        try:
            await self.flush()
        finally:
            db, self._db = self._db, None
            self._closed = True
            await db.close()

    async def _flush_soon(self) -> None:
        """Flush within ``flush_interval`` of the first change since the last one."""
        assert self._wake is not None
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except Exception:
                log.exception("writing state to %s failed; retrying", self.path)

    def _touch(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # ---------------------------------------------------------------- writes
    async def flush(self) -> None:
        """Commit every change made so far, in one transaction.

        Concurrent callers share a commit: whoever holds the lock writes what
        all of them changed, and the others find nothing left to write.
        """
        if self._db is None or self._flush_lock is None:
            return
        async with self._flush_lock:
            if self._writing is not None:
                # A write whose caller was cancelled goes on; it must end first.
                await asyncio.wait([self._writing])
                if not self._writing.cancelled():
                    self._writing.exception()  # retrieved: its records are dirty again
                self._writing = None
            if not self._dirty_tasks and not self._dirty_agents and not self._dirty_meta:
                return
            if self._wake is not None:
                self._wake.clear()
            task_ids, self._dirty_tasks = self._dirty_tasks, set()
            agent_ids, self._dirty_agents = self._dirty_agents, set()
            meta_keys, self._dirty_meta = self._dirty_meta, set()
            meta_rows = [(k, json.dumps(self._meta[k])) for k in meta_keys]
            task_rows, task_gone = [], []
            for task_id in task_ids:
                task = self._tasks.get(task_id)
                if task is None:
                    task_gone.append((task_id,))
                else:
                    task_rows.append((task_id, task.status.value, task_to_record(task)))
            agent_rows, agent_gone = [], []
            for agent_id in agent_ids:
                agent = self._agents.get(agent_id)
                if agent is None:
                    agent_gone.append((agent_id,))
                else:
                    agent_rows.append((agent_id, agent_to_record(agent)))
            # A task of its own: cancelling a caller must not cut a transaction in two.
            self._writing = asyncio.get_running_loop().create_task(
                self._write(
                    (task_ids, agent_ids, meta_keys),
                    (task_rows, task_gone, agent_rows, agent_gone, meta_rows),
                )
            )
            await asyncio.wait([self._writing])
            writing, self._writing = self._writing, None
            writing.result()

    async def _write(self, ids, rows) -> None:
        try:
            await self._transaction(*rows)
        except BaseException:
            # Not written: keep them dirty for the next flush.
            task_ids, agent_ids, meta_keys = ids
            self._dirty_tasks |= task_ids
            self._dirty_agents |= agent_ids
            self._dirty_meta |= meta_keys
            self._touch()
            raise

    async def _transaction(self, task_rows, task_gone, agent_rows, agent_gone, meta_rows) -> None:
        db = self._db
        assert db is not None
        await db.execute("BEGIN")
        try:
            if task_rows:
                await db.executemany(
                    "INSERT INTO tasks (task_id, status, record) VALUES (?, ?, ?) "
                    "ON CONFLICT (task_id) DO UPDATE SET "
                    "status = excluded.status, record = excluded.record",
                    task_rows,
                )
            if task_gone:
                await db.executemany("DELETE FROM tasks WHERE task_id = ?", task_gone)
            if agent_rows:
                await db.executemany(
                    "INSERT INTO agents (agent_id, record) VALUES (?, ?) "
                    "ON CONFLICT (agent_id) DO UPDATE SET record = excluded.record",
                    agent_rows,
                )
            if agent_gone:
                await db.executemany("DELETE FROM agents WHERE agent_id = ?", agent_gone)
            if meta_rows:
                await db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    meta_rows,
                )
            await db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                await db.execute("ROLLBACK")
            raise

    async def save_task(self, task: Task) -> None:
        await self.open()
        self._tasks[task.task_id] = snapshot_task(task)
        self._dirty_tasks.add(task.task_id)
        self._touch()

    async def delete_task(self, task_id: str) -> None:
        await self.open()
        if self._tasks.pop(task_id, None) is not None:
            self._dirty_tasks.add(task_id)
            self._touch()

    async def save_agent(self, agent: AgentCapability) -> None:
        await self.open()
        self._agents[agent.agent_id] = snapshot_agent(agent)
        self._dirty_agents.add(agent.agent_id)
        self._touch()

    async def delete_agent(self, agent_id: str) -> None:
        await self.open()
        if self._agents.pop(agent_id, None) is not None:
            self._dirty_agents.add(agent_id)
            self._touch()

    async def save_meta(self, key: str, value: Any) -> None:
        await self.open()
        self._meta[key] = json.loads(json.dumps(value))  # a copy, and JSON or an error now
        self._dirty_meta.add(key)
        self._touch()

    async def get_meta(self, key: str) -> Any:
        await self.open()
        value = self._meta.get(key)
        return None if value is None else json.loads(json.dumps(value))

    # ----------------------------------------------------------------- reads
    async def get_task(self, task_id: str) -> Task | None:
        if self._db is None:
            await self.open()
        task = self._tasks.get(task_id)
        return None if task is None else snapshot_task(task)

    async def tasks(self) -> list[Task]:
        await self.open()
        return [snapshot_task(t) for t in self._tasks.values()]

    async def agents(self) -> list[AgentCapability]:
        await self.open()
        return [snapshot_agent(a) for a in self._agents.values()]
