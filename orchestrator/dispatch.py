"""The outbox: getting each attempt's message into its queue, and noticing when it is not.

An attempt's delivery state is one persisted field, ``Task.delivery``, and
only this module writes it (see ``models.Delivery``): the publish path marks,
saves and watches the attempt before any bus call, so whatever fails, the
watch finds it. The watch republishes an attempt that never reached its
queue: a delayed retry the broker dropped (DESIGN.md: classic queues
dead-letter at most once), or one saved by an orchestrator that stopped
before it published it. The withdrawal rule (a submit whose task certainly
reached no queue leaves no trace) is decided from the same field.

The broker says when a message published with a delay arrives at the
latest (``CommunicationBus.arrival_bound``): its TTL tiers stay in ``broker``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from broker import (
    BusError,
    BusNotStarted,
    CommunicationBus,
    MessageTooLarge,
    TaskMessage,
    TopologyMismatch,
    TopologyMissing,
    UnroutableMessage,
    route_key,
    task_message_id,
    tracing,
)

from .lifecycle import Lifecycle, Move
from .models import Delivery, Task, TaskStatus
from .placement import MEMO_SIZE, PlacementPolicy, QueueSpec
from .records import TaskRecords
from .settings import OrchestratorSettings
from .timeouts import RunDeadlines

log = logging.getLogger(__name__)

NOT_ROUTED = (MessageTooLarge, TopologyMismatch, TopologyMissing, UnroutableMessage)
"""What ``publish_task`` raises only when its message is in no queue: refused before
it was sent (too large; a queue or exchange that cannot be declared), or returned
by the broker as unroutable. Anything else it raises (a lost connection, a confirm
that never came, a closed channel) may come after the broker routed the message."""


def in_flight(task: Task | None, attempt: int) -> bool:
    """Whether ``attempt`` is still the task's queued attempt (not superseded,
    taken by an agent or ended while we waited)."""
    return (
        task is not None
        and task.status is TaskStatus.PENDING
        and task.attempt == attempt
        and attempt >= 1
    )


def never_started(task: Task) -> bool:
    """Still its first attempt, queued, and no agent ever reported it started
    (a task handed back by an agent that stopped is queued again, started)."""
    return task.status is TaskStatus.PENDING and task.attempt == 1 and task.started_at is None


_keys: dict[tuple[str, tuple[str, ...]], str] = {}


def queue_key(task: Task) -> str:
    """The key of the queue a task's messages go to (its type and capabilities).

    Asked several times per attempt (a submit, its publish, the queue's
    declaration), so each distinct one is built once (``route_key`` sorts and
    joins the capabilities, and matches the type against a pattern)."""
    wanted = (task.task_type, tuple(task.required_capabilities))
    key = _keys.get(wanted)
    if key is None:
        if len(_keys) >= MEMO_SIZE:
            _keys.clear()
        key = _keys[wanted] = route_key(task.task_type, task.required_capabilities)
    return key


class Queues:
    """The task queues this orchestrator declared, by key, with what their tasks need.

    A queue is ``in_use`` once every agent that can consume it was told to;
    until then it is ``declaring``: an agent that registers meanwhile hears
    of it too (see ``AgentRegistry.send_queues``).
    """

    def __init__(self) -> None:
        self.in_use: dict[str, QueueSpec] = {}
        self.declaring: dict[str, QueueSpec] = {}

    def known(self) -> dict[str, QueueSpec]:
        return {**self.in_use, **self.declaring}

    def note(self, task: Task) -> None:
        """A stored unfinished task's queue, after a restart (declared again by
        ``Dispatch.redeclare``: it may have gone meanwhile, purged or lost with
        a broker's data). A finished task's queue is declared by the next
        submit that needs it."""
        if not task.status.is_final:
            self.in_use.setdefault(queue_key(task), QueueSpec.of(task))


class Dispatch:
    def __init__(
        self,
        bus: CommunicationBus,
        records: TaskRecords,
        lifecycle: Lifecycle,
        settings: OrchestratorSettings,
        placement: PlacementPolicy,
        tell_agents: Callable[[QueueSpec], Awaitable[None]],
    ) -> None:
        self.bus = bus
        self.records = records
        self.lifecycle = lifecycle
        self.settings = settings
        self.placement = placement
        self.queues = Queues()
        self._tell_agents = tell_agents
        self._due = RunDeadlines()
        self._ensuring: dict[str, asyncio.Future[None]] = {}
        """The declaration under way of each new queue, which every publish to it awaits."""
        """Queued attempts, until they should have reached their queue (plus grace)."""
        lifecycle.observe(self)

    # -------------------------------------------------------------- observing
    def moved(self, task: Task, move: Move) -> None:
        if move.new is TaskStatus.PENDING and move.attempt == move.old_attempt:
            # An agent handed its delivery back to the broker: it is in its queue.
            task.delivery = Delivery.CONFIRMED
        elif move.new is not TaskStatus.PENDING:
            # Held by an agent, or ended: its message is not the bus's business any more.
            task.delivery = Delivery.NONE
            task.retry_due = None
            self._due.discard(task.task_id)

    def reloaded(self, task: Task, now: float) -> None:
        """Watch a queued attempt found in the store, if it may be lost.

        Watched from now at the earliest: an agent may have taken it while no
        orchestrator ran, its queue empty then, and its events still wait in
        our events queue. Overdue at once, the first round would publish it
        again and those events would be ignored as superseded; the grace lets
        them be handled first.
        """
        if task.delivery is Delivery.PUBLISHING:
            task.delivery = Delivery.SENT  # its publisher died: it may have been routed
        elif task.delivery is Delivery.NONE and task.retry_due is not None:
            task.delivery = Delivery.SENT  # a record from before the delivery field
        if task.status is TaskStatus.PENDING and task.delivery.watched:
            self._watch(task, since=max(task.retry_due or now, now))

    def postpone(self, seconds: float) -> None:
        """Nobody could be heard for ``seconds``: the watched attempts get as long."""
        self._due.postpone(seconds)

    # ------------------------------------------------------------- publishing
    def certainly_unsent(self, task: Task) -> bool:
        """Whether a failed submit may withdraw ``task``: it is in no queue for sure."""
        return task.delivery is Delivery.UNSENT and never_started(task)

    async def publish(
        self,
        task: Task,
        *,
        delay: float = 0.0,
        avoid: list[str] | None = None,
        send: bool = True,
    ) -> None:
        """Hand the task to the bus as a new attempt, after ``delay`` seconds.

        The attempt is marked queued, saved and watched first, before anything
        can fail. ``send`` False only marks it so, without a word to the bus
        (it is failing: the watch publishes it when it can, declaring its
        queue then).
        """
        self.lifecycle.transition(task, TaskStatus.PENDING, new_attempt=True)
        attempt = task.attempt
        task.retry_due = self.lifecycle.clock() + self.bus.arrival_bound(delay)
        # Being sent: saved (and flushed below) as publishing before the bus has
        # it, so a restart that finds it so knows it may have been routed.
        task.delivery = Delivery.PUBLISHING if send else Delivery.UNSENT
        self._watch(task)
        await self.records.save(task)
        if not send:
            return
        handed = False
        try:
            # Written before published: events of this attempt must find it on restart.
            await self.records.flush()
            key = queue_key(task)
            if key not in self.queues.in_use:  # (mostly in use: no coroutine for nothing)
                await self.ensure_queue(task)
            message = self._message(task, avoid or [])
            if not in_flight(task, attempt):
                return  # superseded (cancelled, or published again) while we waited
            if not self.bus.is_connected:
                raise BusNotStarted("the bus is not connected")
            handed = True
            with tracing.task_send_span(
                self.bus.topology,
                key,
                message_id=task_message_id(task.task_id, attempt),
                parent=task.trace_context,
            ):
                await self.bus.publish_task(
                    message,
                    queue_key=key,
                    priority=self.placement.message_priority(task),
                    delay=delay,
                )
        except BaseException as exc:
            if in_flight(task, attempt):
                sure = not handed or isinstance(exc, NOT_ROUTED)
                task.delivery = Delivery.UNSENT if sure else Delivery.SENT
                self._watch(task)  # again: a round of the watch may have taken it
            raise
        if not in_flight(task, attempt):
            return
        if delay > 0:
            task.delivery = Delivery.DELAYED  # watched until its tier is over
            await self.records.save(task)
            return
        # Confirmed: in its durable queue, it can no longer be lost, so nobody
        # watches it any more, not even an orchestrator that restarts before it
        # starts. That one could not tell it from an attempt an agent took while
        # no orchestrator ran (the queue is empty, its events wait in the events
        # queue): publishing it again would cancel the running attempt, or discard
        # its result as superseded. Durable with the next flush.
        task.delivery = Delivery.CONFIRMED
        task.retry_due = None
        self._due.discard(task.task_id)
        try:
            await self.records.save(task)
        except Exception:
            # The publish succeeded: a failure of this bookkeeping (a store closed by
            # a stop racing this publish) is no failed publish. Unsaved, a restart
            # watches it again, as it does any publish it never saw confirmed.
            log.exception("task %s: saving its confirmed publish failed", task.task_id)

    async def redeclare(self) -> None:
        """Declare again the queues of the stored unfinished tasks (idempotent).

        The last orchestrator declared them, but agents only check them
        passively: one deleted while no orchestrator ran would leave its agents
        unable to consume it and its tasks (published again by the watch) with
        nowhere to go."""
        for key in list(self.queues.in_use):
            await self.bus.declare_task_queue(key)

    async def ensure_queue(self, task: Task) -> None:
        """Declare the queue of a task's type and capabilities if it is new to this
        orchestrator, and have every agent that can consume it told to. It counts
        as in use only once they all were: if anything fails, the next publish
        does it all again (both steps are idempotent)."""
        key = queue_key(task)
        if key in self.queues.in_use:
            return
        # Once per queue, however many publishes wait for it: a burst of 500
        # submits of a new type made 500 declarations and told every agent 500
        # times, all in line on one channel, past the submits' time bound.
        # Shielded: a publish whose bound is up leaves it to the others.
        ensuring = self._ensuring.get(key)
        if ensuring is None:
            ensuring = asyncio.ensure_future(self._declare(key, QueueSpec.of(task)))
            self._ensuring[key] = ensuring
            ensuring.add_done_callback(lambda done: self._declared(key, done))
        await asyncio.shield(ensuring)

    def _declared(self, key: str, done: asyncio.Future[None]) -> None:
        if self._ensuring.get(key) is done:
            del self._ensuring[key]  # a failed one is tried again by the next publish
        if not done.cancelled():
            done.exception()  # heard by its waiters; not "never retrieved" if none is left

    async def _declare(self, key: str, spec: QueueSpec) -> None:
        await self.bus.declare_task_queue(key)
        # Kept if telling fails: the queue exists, a new agent may as well consume it.
        self.queues.declaring[key] = spec
        await self._tell_agents(spec)
        self.queues.declaring.pop(key, None)
        self.queues.in_use[key] = spec

    def _message(self, task: Task, avoid: list[str]) -> TaskMessage:
        results: dict[str, Any] = {}
        for dep_id in task.dependencies:
            dep = self.records.get(dep_id)
            if dep is not None:
                results[dep_id] = dep.result
        return TaskMessage(
            task_id=task.task_id,
            attempt=task.attempt,
            name=task.name,
            task_type=task.task_type,
            payload=task.payload,
            priority=task.priority.value,
            required_capabilities=task.required_capabilities,
            timeout=task.timeout,
            estimated_duration=task.estimated_duration,
            dependency_results=results,
            avoid_agents=avoid,
        )

    # --------------------------------------------------------------- watching
    def _watch(self, task: Task, *, since: float | None = None) -> None:
        """Watch a queued attempt until it should have reached its queue: from
        ``retry_due`` (or ``since``), plus ``lost_retry_grace``."""
        if since is None:
            since = task.retry_due or self.lifecycle.clock()
        self._due.start(task.task_id, task.attempt, since + self.settings.lost_retry_grace)

    async def check_lost(self, on_too_large: Callable[[Task, Exception], Awaitable[None]]) -> None:
        """Publish again each watched attempt that never reached its queue.

        Overdue with its queue empty means lost; if it was not, the attempt
        fence makes the copy harmless. One depth look-up per queue per round.
        The round's attempts left the watch when they expired: whatever happens,
        each one not looked at yet is watched again (a bus failure pauses the
        round; any other failure costs only the attempt it happened to).
        ``on_too_large``: what becomes of one that can never be published.
        """
        now = self.lifecycle.clock()
        later = now + self.settings.lost_retry_grace
        depths: dict[str, int] = {}
        due = self._due.expired(now)
        done = 0
        try:
            for task_id, attempt in due:
                try:
                    await self._check_one(task_id, attempt, depths, later, on_too_large)
                except BusError as exc:
                    log.warning("watch of queued tasks paused: %s", exc)
                    return
                except Exception:
                    log.exception("watch of task %s (attempt %d) failed", task_id, attempt)
                    if task_id not in self._due:
                        self._due.start(task_id, attempt, later)
                done += 1
        finally:
            for other_id, other_attempt in due[done:]:
                if other_id not in self._due:
                    self._due.start(other_id, other_attempt, later)

    async def _check_one(
        self,
        task_id: str,
        attempt: int,
        depths: dict[str, int],
        later: float,
        on_too_large: Callable[[Task, Exception], Awaitable[None]],
    ) -> None:
        """One attempt of a ``check_lost`` round. Its state is looked at again
        after every wait: an event handled meanwhile may have started it."""
        task = self.records.get(task_id)
        if task is None or not in_flight(task, attempt) or not task.delivery.watched:
            return
        if task.delivery is Delivery.PUBLISHING:
            # Its publish is still under way (a slow bus): look again later.
            self._due.start(task_id, attempt, later)
            return
        if task.delivery is not Delivery.UNSENT:
            key = queue_key(task)
            if key not in depths:
                depths[key] = await self.bus.queue_depth(key)
                if not in_flight(task, attempt):
                    return  # started (or cancelled, or published again) while we looked
            if depths[key] > 0:
                # It may wait behind others: look again later.
                self._due.start(task_id, attempt, later)
                return
        log.warning(
            "task %s (attempt %d) never reached its queue: publishing it again", task_id, attempt
        )
        try:
            await self.publish(task)
        except MessageTooLarge as exc:
            await on_too_large(task, exc)
