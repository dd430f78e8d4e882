"""One active orchestrator per prefix: the lease, the epoch, standing by, stepping down.

Any number of orchestrators (``orchestrator serve`` processes, or
``TaskOrchestrator`` objects in services) may run on one prefix; one leads
and the others stand by. Two brains on one prefix cancel each other's
tasks and tell each other's agents to leave, so leading takes two locks:

- **The broker's lease** (``CommunicationBus.lease``: on RabbitMQ the
  exclusive queue ``<prefix>.orchestrator.leader``). The broker grants it to
  one connection and takes it back the moment that connection ends, so a
  killed leader frees it at once and a standby, trying every
  ``poll_interval``, takes over within about a second.
- **The store's epoch** (``StateStore.claim_epoch``). The new leader raises
  it before it reads anything; from then on the old leader's store object
  refuses to write (``StoreFenced``). So a leader that was paused (a stopped
  process, a long GC, a partition) and wakes up believing it still leads
  changes nothing: its first flush fails, and it steps down.

Becoming leader: take the lease, claim the epoch, then the orchestrator's
``on_lead`` reloads the records from the store and starts consuming and
publishing. Stepping down (lease lost, or a flush fenced): ``on_step_down``
stops consuming and publishing; the orchestrator does not lead again with
the state it held (it may be stale), so an ``orchestrator serve`` starts a
fresh one as a standby. API calls on a standby raise ``NotLeader`` naming
the leader, as far as it is known: a standby reads it, every poll, from the
store's epoch row (its last claim, whatever kind of orchestrator made it;
the row alone, not the records, which would be stale at takeover).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from broker import BusError, CommunicationBus, Lease, StatsRequest

from .store import StateStore, StoreFenced

log = logging.getLogger(__name__)

LINEAGE = "leader_lineage"
"""The store's meta key naming it among stores (see ``Leadership._lineage``)."""
LEASE_POLL_INTERVAL = 1.0
"""Seconds between a standby's tries of the lease: the takeover delay after a
leader's death (RabbitMQ logs each refused try as a channel error)."""


class Role(enum.StrEnum):
    LEADER = "leader"
    STANDBY = "standby"
    STOPPED = "stopped"


@dataclass(frozen=True)
class LeaderInfo:
    """Who leads a prefix, as far as this orchestrator knows (None: not known)."""

    id: str | None = None
    epoch: int | None = None

    def describe(self) -> str:
        if self.id is None:
            return "another orchestrator (it holds the lease)"
        return f"{self.id} (epoch {self.epoch})"


class NotLeader(ConnectionError):
    """Raised by the API of an orchestrator that stands by: another one leads
    its prefix. Send requests to the leader (``Client``, or ``orchestrator``
    commands reach it over RPC); this one takes over if the leader goes."""

    def __init__(self, holder: str, leader: LeaderInfo, why: str = "") -> None:
        self.leader = leader
        super().__init__(
            f"not_leader: orchestrator {holder} stands by{why}; the leader is {leader.describe()}"
        )


def default_holder() -> str:
    """This orchestrator's name in the lease and the store: host, process, a nonce."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


Hook = Callable[[], Awaitable[None]]
Observer = Callable[[Role], Awaitable[None]]


class Leadership:
    """Whether this orchestrator leads its prefix, and the moves between roles."""

    def __init__(
        self,
        bus: CommunicationBus,
        store: StateStore,
        *,
        holder: str | None = None,
        poll_interval: float = LEASE_POLL_INTERVAL,
        reclaim: bool = True,
    ) -> None:
        self.bus = bus
        self.reclaim = reclaim
        self.store = store
        self.holder = holder or default_holder()
        self.poll_interval = poll_interval
        self.role = Role.STOPPED
        self.epoch: int | None = None
        self.leader = LeaderInfo()
        self.stepped_down = asyncio.Event()
        """Set once this orchestrator led and stepped down: it does not lead again."""
        self._leading = asyncio.Event()
        self._lease: Lease | None = None
        self._task: asyncio.Task[None] | None = None
        self._stepping: asyncio.Task[None] | None = None
        self._on_lead: Hook | None = None
        self._on_step_down: Hook | None = None
        self._observers: list[Observer] = []
        self._reclaiming = False
        """The lease's connection ended and we are taking it back (see ``_reclaim``)."""
        self._fence_flush(store)

    # ----------------------------------------------------------------- roles
    @property
    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    def describe(self) -> dict[str, Any]:
        """For ``get_stats``: this orchestrator's role and who leads."""
        return {
            "role": self.role.value,
            "orchestrator_id": self.holder,
            "leader": {"id": self.leader.id, "epoch": self.leader.epoch},
        }

    def observe(self, observer: Observer) -> None:
        """``observer(role)`` is awaited after each change of role."""
        self._observers.append(observer)

    def require_leader(self) -> None:
        """Raise ``NotLeader`` unless this orchestrator leads (or was never started)."""
        if self.role is Role.STANDBY:
            why = ": it stepped down" if self.stepped_down.is_set() else ""
            raise NotLeader(self.holder, self.leader, why)

    async def confirm(self) -> bool:
        """Whether this orchestrator still leads, with the lease confirmed by the
        broker: what a leader asks before it judges anyone by their silence (after
        a pause, it may have lost the lease without having heard yet)."""
        if self.role is not Role.LEADER or self._reclaiming:
            return False
        if self._lease is None or await self._lease.confirm():
            return True
        # Lost with its connection: ``_hold`` takes it back, or steps down.
        return False

    async def wait_leading(self) -> None:
        await self._leading.wait()

    # ------------------------------------------------------------- lifecycle
    async def start(self, on_lead: Hook, on_step_down: Hook) -> bool:
        """Lead now if the lease is free (True), else stand by and take over
        when it frees (False). ``on_lead`` runs once leading (lease and epoch
        held); if it raises, the lease is given back and it raises here."""
        self._on_lead, self._on_step_down = on_lead, on_step_down
        try:
            self._lease = self.bus.lease(self.holder)
        except NotImplementedError:
            self._lease = None  # a bus without a lease: fencing alone guards the store
        if await self._try_lead():
            return True
        await self._learn_from_store()  # named in get_stats from the start
        await self._set_role(Role.STANDBY)
        self._task = asyncio.get_running_loop().create_task(self._stand_by())
        return False

    async def stop(self) -> None:
        """Stop standing by or leading (the caller has stopped its work); give the lease back."""
        for task in (self._task, self._stepping):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._stepping = None
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self._lease.release()
        self.role = Role.STOPPED
        self._leading.clear()

    async def _try_lead(self) -> bool:
        lease = self._lease
        if lease is not None and not await lease.acquire():
            return False
        try:
            self.epoch = await self.store.claim_epoch(self.holder)
            self.leader = LeaderInfo(self.holder, self.epoch)
            # Every command now says which epoch of which store sent it: an agent
            # that has heard this one obeys no older leader of that store.
            self.bus.leader = (await self._lineage(), self.epoch)
            self.role = Role.LEADER
            assert self._on_lead is not None
            await self._on_lead()
        except BaseException:
            self.role = Role.STANDBY
            if lease is not None:
                with contextlib.suppress(Exception):
                    await lease.release()
            raise
        log.info("leading prefix %r as %s (epoch %d)", self.bus.settings.prefix, *self.leader_pair)
        self._leading.set()
        if lease is not None:
            self._task = asyncio.get_running_loop().create_task(self._hold(lease))
        await self._notify()
        return True

    async def _lineage(self) -> str:
        """The name of the store the epochs count in, made by its first leader:
        epochs of another store (a fresh in-memory one after a restart) start
        again at 1, and an agent must not take them for old ones."""
        lineage = await self.store.get_meta(LINEAGE)
        if not isinstance(lineage, str):
            lineage = uuid.uuid4().hex[:12]
            await self.store.save_meta(LINEAGE, lineage)
        return lineage

    @property
    def leader_pair(self) -> tuple[str | None, int | None]:
        return self.leader.id, self.leader.epoch

    async def _stand_by(self) -> None:
        """Try the lease every ``poll_interval`` until it is ours; follow who leads."""
        if self.leader.id is None:
            await self._learn_leader()
        log.info(
            "standing by on prefix %r, leader is %s",
            self.bus.settings.prefix,
            self.leader.describe(),
        )
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                if await self._try_lead():
                    return
            except (BusError, ConnectionError, OSError) as exc:
                log.warning("standing by: cannot try the lease: %s", exc)
            except StoreFenced as exc:  # claimed again at once by someone else
                log.warning("standing by: %s", exc)
            except Exception:
                log.exception("standing by: taking over failed; trying again")
            known = self.leader
            if await self._learn_leader() and self.leader != known:
                log.info("standing by, leader is %s", self.leader.describe())

    async def _learn_leader(self) -> bool:
        """Who leads: the store's epoch row, else (a store of this process
        alone, ``MemoryStore``) the leader's own stats; whether it is known."""
        return await self._learn_from_store() or await self._ask_leader()

    async def _learn_from_store(self) -> bool:
        """Who leads, by the store's epoch row (its last claim); whether it named one.

        Whatever kind the leader is (a ``TaskOrchestrator`` answers no
        request). The row is read alone, not the records: records read now
        would be stale when this orchestrator takes over.
        """
        try:
            epoch, holder = await self.store.current_epoch()
        except Exception as exc:  # the store is down: the leader stays as known
            log.debug("standing by: cannot read the store's epoch: %s", exc)
            return False
        if epoch < 1 or not isinstance(holder, str) or holder == self.holder:
            return False
        self.leader = LeaderInfo(holder, epoch)
        return True

    async def _ask_leader(self) -> bool:
        """Ask the leader who it is (an ``orchestrator serve`` answers stats
        requests); whether it answered."""
        with contextlib.suppress(Exception):
            reply = await self.bus.request(StatsRequest(), timeout=self.poll_interval + 1)
            leader = (reply.result or {}).get("leader") if reply.ok else None
            if isinstance(leader, dict) and isinstance(leader.get("id"), str):
                epoch = leader.get("epoch")
                self.leader = LeaderInfo(leader["id"], epoch if isinstance(epoch, int) else None)
                return True
        return False

    async def _hold(self, lease: Lease) -> None:
        while True:
            await lease.wait_lost()
            if not self.reclaim or not await self._reclaim(lease):
                await self._step_down("the broker took the lease back (its connection ended)")
                return

    async def _reclaim(self, lease: Lease) -> bool:
        """Take the lease back after its connection ended; whether we still lead.

        A broker restart or a network blip ends the lease's connection without
        anyone else leading: stepping down for it would leave the prefix with
        no leader (an in-process ``TaskOrchestrator`` does not lead again) and
        cost every waiter its answer. So the leader tries the lease again as
        soon as the broker answers, and goes on leading if it gets it with the
        store's epoch still its own: nobody led meanwhile, its state is
        current. Another connection holding the lease, or a newer epoch,
        means another orchestrator led: then it steps down. Meanwhile its watch
        judges nobody (``confirm`` is False) and a write under a newer epoch is
        fenced as always."""
        self._reclaiming = True
        log.warning(
            "the lease of prefix %r was lost with its connection: taking it back",
            self.bus.settings.prefix,
        )
        try:
            while self.role is Role.LEADER:
                await asyncio.sleep(self.poll_interval)
                try:
                    if not await lease.acquire():
                        return False  # held by another connection: another orchestrator
                    epoch, holder = await self.store.current_epoch()
                except (BusError, ConnectionError, OSError):
                    continue  # the broker (or the store) is not back yet
                if (epoch, holder) == (self.epoch, self.holder):
                    log.info("took the lease of prefix %r back", self.bus.settings.prefix)
                    return True
                with contextlib.suppress(Exception):
                    await lease.release()
                return False
            return False
        finally:
            self._reclaiming = False

    # ----------------------------------------------------------- stepping down
    def _fence_flush(self, store: StateStore) -> None:
        """Make every flush of ``store`` (the orchestrator's, the subscriptions'
        before-ack, the store's own background one) step down on ``StoreFenced``."""
        flush = store.flush

        async def fenced_flush() -> None:
            try:
                await flush()
            except StoreFenced as exc:
                self.fenced(exc)
                raise

        store.flush = fenced_flush  # type: ignore[method-assign]

    def fenced(self, exc: StoreFenced) -> None:
        """A write was refused under a newer epoch: step down (in a task of its
        own: the caller may be a handler that stepping down cancels)."""
        if self.role is Role.LEADER and self._stepping is None:
            self.leader = LeaderInfo(exc.holder, exc.current)
            self._stepping = asyncio.get_running_loop().create_task(self._step_down(str(exc)))

    async def _step_down(self, reason: str) -> None:
        if self.role is not Role.LEADER:
            return
        log.warning("stepping down as leader of prefix %r: %s", self.bus.settings.prefix, reason)
        self.role = Role.STANDBY
        self._leading.clear()
        self.stepped_down.set()
        try:
            assert self._on_step_down is not None
            await self._on_step_down()
        finally:
            if self._lease is not None:
                with contextlib.suppress(Exception):
                    await self._lease.release()
            if self.leader.id == self.holder:
                self.leader = LeaderInfo()
            await self._notify()

    async def _set_role(self, role: Role) -> None:
        self.role = role
        await self._notify()

    async def _notify(self) -> None:
        for observer in list(self._observers):
            try:
                await observer(self.role)
            except Exception:
                log.exception("an observer of the leadership failed")
