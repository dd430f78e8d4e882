"""The write-behind journal that the durable stores (SQLite, PostgreSQL) share.

Reads never touch the database: every record saved lives in memory as a
snapshot, as in ``MemoryStore``, and the database is the write-ahead copy.
``save_*`` marks a record dirty and ``flush`` writes every dirty record in
one transaction. The orchestrator flushes before it publishes a task and
before it acknowledges the events it handled, so nothing the broker forgets
is missing from the database; a background flush covers the rest (agent
heartbeats, progress) within ``flush_interval``.

A write that fails is never lost: its records stay dirty for the next flush.
A backend may call a failure transient (the database restarting, a
connection cut): then ``flush`` tries again, with back-off, for up to
``retry_for`` seconds before it raises, taking in what was saved meanwhile,
so the callers wait out a short outage instead of failing on it.

A backend implements the connection, the load, one transaction and the
epoch row; fencing (``StoreFenced``) is decided here from what the
transaction reads of the epoch, inside that same transaction.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from .models import AgentCapability, Task
from .records_codec import agent_from_record, agent_to_record, task_from_record, task_to_record
from .store import StateStore, StoreFenced, snapshot_agent, snapshot_task

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """What a backend read at open, as stored text."""

    tasks: list[str] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)
    meta: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Batch:
    """One flush's rows: upserts and deletes of tasks, agents and meta values."""

    task_rows: list[tuple[str, str, str]] = field(default_factory=list)
    """(task_id, status, record)"""
    task_gone: list[str] = field(default_factory=list)
    agent_rows: list[tuple[str, str]] = field(default_factory=list)
    agent_gone: list[str] = field(default_factory=list)
    meta_rows: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Dirty:
    tasks: set[str] = field(default_factory=set)
    agents: set[str] = field(default_factory=set)
    meta: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.tasks or self.agents or self.meta)

    def take(self) -> _Dirty:
        taken = _Dirty(self.tasks, self.agents, self.meta)
        self.tasks, self.agents, self.meta = set(), set(), set()
        return taken

    def add(self, other: _Dirty) -> None:
        self.tasks |= other.tasks
        self.agents |= other.agents
        self.meta |= other.meta


class JournalStore(StateStore):
    """A durable ``StateStore``: records in memory, written behind to a database."""

    durable = True

    def __init__(self, *, flush_interval: float, retry_for: float) -> None:
        self.flush_interval = flush_interval
        self.retry_for = retry_for
        self._tasks: dict[str, Task] = {}
        self._agents: dict[str, AgentCapability] = {}
        self._meta: dict[str, Any] = {}
        self._dirty = _Dirty()
        self._opened = False
        self._connected = False
        """Connected (and migrated); the records may not be read yet (``current_epoch``)."""
        self._opening: asyncio.Lock | None = None
        self._flush_lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._closing: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._writing: asyncio.Task[None] | None = None
        self._closed = False
        self._epoch: int | None = None
        """The epoch this object claimed, which its writes are fenced by (None: unfenced)."""
        self._fenced: StoreFenced | None = None
        # Group commit: changes are numbered as they are saved; ``_written`` is the
        # number of the last one durable. A flush is done once its caller's last
        # change is, whoever wrote it.
        self._saved = 0
        self._written = 0

    # ------------------------------------------------------------ the backend
    @property
    @abc.abstractmethod
    def where(self) -> str:
        """The database, for messages (no password)."""

    @abc.abstractmethod
    async def _connect(self) -> None:
        """Connect and bring the schema up to date."""

    @abc.abstractmethod
    async def _load(self) -> Loaded:
        """Read every record (one consistent snapshot)."""

    @abc.abstractmethod
    async def _transaction(self, batch: Batch, fence: int | None) -> None:
        """Write ``batch`` in one transaction. With a ``fence``, first read the
        epoch in that transaction (locked against a claim) and, if it is newer,
        write nothing and raise ``StoreFenced`` (see ``_fence``)."""

    @abc.abstractmethod
    async def _claim(self, holder: str) -> int:
        """Raise the epoch by one, record ``holder``; the new epoch."""

    @abc.abstractmethod
    async def _read_epoch(self) -> tuple[int, str | None]: ...

    @abc.abstractmethod
    async def _disconnect(self) -> None: ...

    def _transient(self, exc: Exception) -> bool:
        """Whether a failed write may succeed if tried again soon (an outage)."""
        return False

    def _fence(self, fence: int, current: int, holder: str | None) -> None:
        """For the backend's transaction: raise ``StoreFenced`` if overtaken."""
        if current > fence:
            raise StoreFenced(self.where, fence, current, holder)

    # ------------------------------------------------------------- lifecycle
    async def open(self) -> None:
        """Connect, migrate, and read every record; idempotent."""
        await self._open(None)

    def _opening_lock(self) -> asyncio.Lock:
        """What an open, and a read before one, hold while they connect; a closed
        store refuses both."""
        if self._closed:
            raise RuntimeError(f"the store on {self.where} is closed")
        if self._opening is None:
            self._opening = asyncio.Lock()
        return self._opening

    async def _open(self, holder: str | None) -> int | None:
        """Open; claiming the epoch for ``holder`` first, if given, so that the
        records read are the ones of this epoch (the epoch claimed; None if it
        was open already)."""
        if self._opened:
            return None
        async with self._opening_lock():
            if self._opened:
                return None
            await self._ensure_connected()
            try:
                epoch = None if holder is None else await self._claim(holder)
                self._take(await self._load())
            except BaseException:
                await self._drop_connection()
                raise
            self._opened = True
            self._flush_lock = asyncio.Lock()
            self._wake = asyncio.Event()
            self._closing = asyncio.Event()
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())
            log.info(
                "state store %s: %d task(s), %d agent(s)",
                self.where,
                len(self._tasks),
                len(self._agents),
            )
            return epoch

    async def _ensure_connected(self) -> None:
        """Connect and migrate, once (under ``_opening``)."""
        if not self._connected:
            await self._connect()
            self._connected = True

    async def _drop_connection(self) -> None:
        self._connected = False
        await self._disconnect()

    def _take(self, loaded: Loaded) -> None:
        """Hold the records ``loaded`` (decoded) as the store's memory."""
        tasks = [task_from_record(text) for text in loaded.tasks]
        agents = [agent_from_record(text) for text in loaded.agents]
        self._tasks = {task.task_id: task for task in tasks}
        self._agents = {agent.agent_id: agent for agent in agents}
        self._meta = {key: json.loads(text) for key, text in loaded.meta}

    async def close(self) -> None:
        """Write what is pending (trying once, not waiting out an outage) and disconnect."""
        if not self._opened:
            self._closed = True
            if self._opening is not None:
                async with self._opening:  # connected only to read the epoch
                    await self._drop_connection()
            return
        assert self._closing is not None and self._flush_lock is not None
        self._closing.set()  # a write waiting to try again gives up now
        if self._flusher is not None:
            async with self._flush_lock:  # never cancel it in the middle of a write
                self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        try:
            await self.flush()
        except StoreFenced as exc:
            log.warning("%s; closing without writing", exc)
        except Exception as exc:
            lost = len(self._dirty.tasks) + len(self._dirty.agents) + len(self._dirty.meta)
            log.error(
                "state store %s closed with %d record(s) not written: %s", self.where, lost, exc
            )
            raise
        finally:
            self._opened = False
            self._closed = True
            await self._drop_connection()

    async def _flush_soon(self) -> None:
        """Flush within ``flush_interval`` of the first change since the last one."""
        assert self._wake is not None
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except StoreFenced as exc:
                log.warning("%s", exc)
            except Exception:
                log.exception("writing state to %s failed; retrying", self.where)

    def _touch(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _changed(self) -> None:
        """A record became dirty: one more change for a flush to make durable."""
        self._saved += 1
        self._touch()

    # ---------------------------------------------------------------- fencing
    async def claim_epoch(self, holder: str) -> int:
        """Claim the epoch, then read the records: a leader must not start from
        records read before its claim (the last leader could still write then).
        A store opened before its claim reads them again, unless it holds
        changes of its own not yet flushed (those it keeps, and writes)."""
        epoch = await self._open(holder)
        if epoch is None:  # open already
            assert self._flush_lock is not None
            async with self._flush_lock:
                if self._writing is not None:
                    await asyncio.wait([self._writing])
                epoch = await self._claim(holder)
                if not self._dirty:
                    self._take(await self._load())
                else:
                    log.warning(
                        "state store %s: claimed with changes not yet written; its records"
                        " are kept as they are, not read again",
                        self.where,
                    )
        self._epoch, self._fenced = epoch, None
        log.info("state store %s: %s leads under epoch %d", self.where, holder, epoch)
        return epoch

    async def current_epoch(self) -> tuple[int, str | None]:
        """The epoch row, read without reading the records: a standby names the
        leader by it, and records read now would be stale when it takes over
        (``claim_epoch`` reads them, after its claim). So an unopened store
        connects (and migrates) only; it reads the records once it is opened."""
        if self._opened:
            return await self._read_epoch()
        async with self._opening_lock():  # not while an open or a close connects or disconnects
            if not self._opened:
                await self._ensure_connected()
            return await self._read_epoch()

    # ---------------------------------------------------------------- writes
    async def flush(self) -> None:
        """Commit every change made so far, in one transaction.

        Concurrent callers share a commit: whoever holds the lock writes what
        all of them changed, and a caller whose changes a write took returns
        when that write is done, not behind the next one.
        """
        if not self._opened or self._flush_lock is None:
            return
        target = self._saved
        if self._written >= target:
            return  # what this caller saved is durable already (written with others')
        async with self._flush_lock:
            if self._writing is not None:
                # A write whose caller was cancelled goes on; it must end first.
                await asyncio.wait([self._writing])
                if not self._writing.cancelled():
                    self._writing.exception()  # retrieved: its records are dirty again
                self._writing = None
            if self._written >= target:
                return  # the write this caller waited for took its changes
            if not self._dirty:
                self._written = max(self._written, target)  # no write under way: all durable
                return
            if self._fenced is not None:
                raise self._fenced
            if self._wake is not None:
                self._wake.clear()
            # A task of its own: cancelling a caller must not cut a transaction in two.
            self._writing = asyncio.get_running_loop().create_task(self._write())
            await asyncio.wait([self._writing])
            writing, self._writing = self._writing, None
            writing.result()

    def _batch(self, ids: _Dirty) -> Batch:
        batch = Batch(meta_rows=[(k, json.dumps(self._meta[k])) for k in ids.meta])
        for task_id in ids.tasks:
            task = self._tasks.get(task_id)
            if task is None:
                batch.task_gone.append(task_id)
            else:
                batch.task_rows.append((task_id, task.status.value, task_to_record(task)))
        for agent_id in ids.agents:
            agent = self._agents.get(agent_id)
            if agent is None:
                batch.agent_gone.append(agent_id)
            else:
                batch.agent_rows.append((agent_id, agent_to_record(agent)))
        return batch

    async def _write(self) -> None:
        """Write the dirty records; a transient failure is tried again (with what
        was saved meanwhile) until ``retry_for`` has passed."""
        assert self._closing is not None
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.retry_for
        delay, failed_since = 0.05, None
        ids = _Dirty()
        while True:
            ids.add(self._dirty.take())
            version = self._saved  # every change up to this one is in ``ids``
            try:
                await self._transaction(self._batch(ids), self._epoch)
            except StoreFenced as exc:
                self._dirty.add(ids)  # kept, but nobody writes them: not touched
                self._fenced = exc
                raise
            except BaseException as exc:
                retry = (
                    isinstance(exc, Exception)
                    and self._transient(exc)
                    and not self._closing.is_set()
                    and loop.time() + delay < give_up
                )
                if not retry:
                    self._dirty.add(ids)  # not written: kept for the next flush
                    self._touch()
                    raise
                if failed_since is None:
                    failed_since = loop.time()
                    log.warning(
                        "cannot write state to %s (%s); trying again for up to %gs",
                        self.where,
                        exc,
                        self.retry_for,
                    )
                try:
                    await asyncio.wait_for(self._closing.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 1.0)
                continue
            self._written = max(self._written, version)
            if failed_since is not None:
                log.warning(
                    "state written to %s again, after %.1fs", self.where, loop.time() - failed_since
                )
            return

    async def save_task(self, task: Task) -> None:
        await self.open()
        self._tasks[task.task_id] = snapshot_task(task)
        self._dirty.tasks.add(task.task_id)
        self._changed()

    async def delete_task(self, task_id: str) -> None:
        await self.open()
        if self._tasks.pop(task_id, None) is not None:
            self._dirty.tasks.add(task_id)
            self._changed()

    async def save_agent(self, agent: AgentCapability) -> None:
        await self.open()
        self._agents[agent.agent_id] = snapshot_agent(agent)
        self._dirty.agents.add(agent.agent_id)
        self._changed()

    async def delete_agent(self, agent_id: str) -> None:
        await self.open()
        if self._agents.pop(agent_id, None) is not None:
            self._dirty.agents.add(agent_id)
            self._changed()

    async def save_meta(self, key: str, value: Any) -> None:
        await self.open()
        self._meta[key] = json.loads(json.dumps(value))  # a copy, and JSON or an error now
        self._dirty.meta.add(key)
        self._changed()

    # ----------------------------------------------------------------- reads
    async def get_meta(self, key: str) -> Any:
        await self.open()
        value = self._meta.get(key)
        return None if value is None else json.loads(json.dumps(value))

    async def get_task(self, task_id: str) -> Task | None:
        if not self._opened:
            await self.open()
        task = self._tasks.get(task_id)
        return None if task is None else snapshot_task(task)

    async def tasks(self) -> list[Task]:
        await self.open()
        return [snapshot_task(t) for t in self._tasks.values()]

    async def agents(self) -> list[AgentCapability]:
        await self.open()
        return [snapshot_agent(a) for a in self._agents.values()]
