"""The attempts an agent holds, and what it remembers of those it will not run.

An attempt (a task id and an attempt number) is known here from the moment its
delivery is taken until that delivery is settled: while its handler runs, and
after it ended (reported, or to be run again), marked ending, until then. So a
redelivery of a known attempt (the broker hands a delivery back when the
channel that had it is lost) is taken for the duplicate it is, rather than run
beside its handler; another attempt of the same task is no duplicate: the
orchestrator has moved on to it.

The agent also remembers the tasks it was told are cancelled, to skip them
when they arrive; how often it handed back each retry it was asked to avoid;
the attempts whose final event it published (a redelivery of one is done
with: its acknowledgement was lost with a link, or a crashed broker brought
the message back); and how often each attempt came back redelivered without
a final event (past ``MAX_REDELIVERIES`` it is dead-lettered rather than run
again). Every memory is bounded: an agent runs for months.

``Slots`` is the agent's own limit of ``max_concurrent_tasks``: an attempt
holds a slot from its start until its handler has really ended. The broker's
prefetch keeps deliveries within the limit as long as the link holds; after
a reconnect the broker hands out a fresh prefetch while handlers of the lost
link still run, and the slots keep the limit then.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from broker import TaskDelivery, TaskMessage

log = logging.getLogger(__name__)

MEMORY = 10_000
"""How many entries each of an agent's memories keeps (cancelled ids, deferred
retries, reported attempts, redelivery counts), the oldest dropped first."""
MAX_REDELIVERIES = 5
"""An attempt delivered again more often than this (the delivery's redelivered
flag) without its final event going out is dead-lettered: whatever makes it
come back (an agent that dies in its handler, a final event that never goes
out) would make it come back forever."""
AVOID_DEFERRALS = 3
"""How often an agent hands back a retry it was asked to avoid before it runs
it after all (the broker may offer it the same message again)."""
LATE_HANDLER_WARNING = 1.0
"""A handler still running this long after its task ended here is logged."""


@dataclass
class AgentCounters:
    """What this agent did, counted inside it (for tests and monitoring)."""

    received: int = 0
    completed: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    running: int = 0
    max_running: int = 0


class StopReason(enum.Enum):
    """Why the agent stopped an attempt before it ended, which decides what
    becomes of it."""

    CANCELLED = "cancelled"
    """On request: reported cancelled, as it is done with."""
    UNREGISTERED = "unregistered"
    """The orchestrator dropped this agent and re-published its tasks: not
    reported, and acknowledged."""
    SHUTDOWN = "shutdown"
    """The agent stops: not reported, and given back to its queue."""


@dataclass(eq=False)
class Attempt:
    message: TaskMessage
    job: asyncio.Future[Any] | None = None
    """The attempt's run (it says it started, runs the handler, makes the final
    event: ``agents.tasks``): done with its final event once it ended, or
    cancelled to stop the attempt (``stop``)."""
    stop_reason: StopReason | None = None
    handler: asyncio.Future[Any] | None = None
    """Done when the handler has really ended (see ``agents.handlers``)."""
    detached: bool = False
    """Acknowledged when it started (a long task): see ``Settlement.detach``."""
    ending: bool = False
    """It has ended here (reported, or to be run again); its delivery is not
    settled yet."""
    counted: bool = True
    """Counted in ``AgentCounters.running``, and holding a slot."""
    delivery: TaskDelivery | None = None
    """The delivery it runs under (its link may be lost meanwhile)."""
    reported: bool = False
    """Its final event went out."""
    trace: str | None = None
    """Where its handler broke, or was when its time ran out (for the log)."""
    notice: Any = None
    """Its ``agents.started.StartNotice``, once it runs: dropped once its final
    event went out or it stopped."""
    decided: asyncio.Future[Any] | None = None
    """The ``Outcome`` its delivery is settled with, once decided: a copy of it
    redelivered after its link was lost is settled the same way."""

    @property
    def key(self) -> tuple[str, int]:
        return (self.message.task_id, self.message.attempt)

    def stop(self, reason: StopReason) -> None:
        """Cancel its job; the first reason given is the one that counts."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.job is not None:
            self.job.cancel()


class Slots:
    """How many attempts may run at once (``max_concurrent_tasks``), handed out
    in the order they are asked for."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    def try_take(self) -> bool:
        """Take a slot if one is free and nobody waits for one."""
        if self._waiting or self.held >= self.limit:
            return False
        self.held += 1
        return True

    def ask(self) -> asyncio.Future[None]:
        """A future done once a slot is taken for the caller (``withdraw`` it
        if the caller stops waiting)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self._hand_out()
        return future

    def withdraw(self, future: asyncio.Future[None]) -> None:
        """The caller of ``ask`` no longer waits: a slot it was given goes back."""
        if future.done() and not future.cancelled():
            self.release()
            return
        future.cancel()
        with contextlib.suppress(ValueError):
            self._waiting.remove(future)

    def release(self) -> None:
        self.held -= 1
        self._hand_out()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._hand_out()

    def _hand_out(self) -> None:
        while self._waiting and self.held < self.limit:
            future = self._waiting.popleft()
            if not future.done():
                self.held += 1
                future.set_result(None)


class Attempts:
    """The attempts known here, by task id and attempt number."""

    def __init__(
        self, agent_id: str, counters: AgentCounters, halted: asyncio.Event, limit: int
    ) -> None:
        self._agent_id = agent_id
        self._counters = counters
        self._halted = halted
        """Set while the agent stops: then nothing waits for a handler's end."""
        self.slots = Slots(limit)
        self._known: dict[tuple[str, int], Attempt] = {}
        self._cancelled: OrderedDict[tuple[str, int | None], None] = OrderedDict()
        self._deferred: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._stepped_aside: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._reported: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._redelivered: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._words: dict[tuple[str, int], set[asyncio.Future[bool]]] = {}

    # ---------------------------------------------------------------- known here
    def __contains__(self, message: TaskMessage) -> bool:
        return (message.task_id, message.attempt) in self._known

    def get(self, message: TaskMessage) -> Attempt | None:
        return self._known.get((message.task_id, message.attempt))

    def keys(self) -> frozenset[tuple[str, int]]:
        return frozenset(self._known)

    def all(self) -> list[Attempt]:
        return list(self._known.values())

    @property
    def running(self) -> int:
        """Those whose handler has not ended here (what a heartbeat tells)."""
        return sum(1 for attempt in self._known.values() if not attempt.ending)

    def unended(self, limit: int) -> list[tuple[str, int]]:
        """The oldest ``limit`` of those, as (task id, attempt)."""
        keys = (key for key, attempt in self._known.items() if not attempt.ending)
        return list(itertools.islice(keys, limit))

    def begin(self, message: TaskMessage, delivery: TaskDelivery | None = None) -> Attempt:
        """Known and counted from now on; the caller has taken its slot."""
        attempt = Attempt(message, delivery=delivery)
        attempt.decided = asyncio.get_running_loop().create_future()
        self._known[attempt.key] = attempt
        counters = self._counters
        counters.received += 1
        counters.running += 1
        counters.max_running = max(counters.max_running, counters.running)
        return attempt

    def count_end(self, outcome: str, by: int = 1) -> None:
        """Count how an attempt run here ended (a ``timeout`` as ``timed_out``);
        ``by=-1`` takes back a count (an end reported otherwise after all)."""
        name = "timed_out" if outcome == "timeout" else outcome
        setattr(self._counters, name, getattr(self._counters, name) + by)

    def jobs(self) -> list[asyncio.Future[Any]]:
        return [a.job for a in self._known.values() if a.job is not None]

    def stop_all(self, reason: StopReason) -> list[Attempt]:
        stopped = self.all()
        for attempt in stopped:
            attempt.stop(reason)
        return stopped

    async def end(self, attempt: Attempt) -> None:
        """Mark it ending, and wait until its handler has really ended (an async
        handler may ignore its cancellation, a sync one be stuck in a C call):
        until then its delivery holds its slot of the prefetch, so that no other
        task runs in its place. A stop does not wait (nothing new is taken then)."""
        attempt.ending = True
        handler = attempt.handler
        if handler is None or handler.done() or self._halted.is_set():
            return
        halted = asyncio.ensure_future(self._halted.wait())
        try:
            done, _ = await asyncio.wait(
                [handler, halted], timeout=LATE_HANDLER_WARNING, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                log.warning(
                    "agent %s: task %s ended but its handler still runs; its slot stays"
                    " taken until the handler ends",
                    self._agent_id,
                    attempt.message.task_id,
                )
                await asyncio.wait([handler, halted], return_when=asyncio.FIRST_COMPLETED)
        finally:
            halted.cancel()

    def uncount(self, attempt: Attempt) -> None:
        """No longer counted running: before its delivery is settled, since the
        broker may then hand this agent another task in its place."""
        if attempt.counted:
            attempt.counted = False
            self._counters.running -= 1
            self.slots.release()

    def forget(self, attempt: Attempt) -> None:
        """No longer known here (and no longer counted). Idempotent."""
        self.uncount(attempt)
        if self._known.get(attempt.key) is attempt:  # not a redelivery's, run since
            del self._known[attempt.key]

    # ---------------------------------------------------------------- ended here
    def reported(self, attempt: Attempt) -> None:
        """Its final event went out: a redelivery of it is done with."""
        attempt.reported = True
        _remember(self._reported, attempt.key, None)
        self._redelivered.pop(attempt.key, None)

    def was_reported(self, message: TaskMessage) -> bool:
        return (message.task_id, message.attempt) in self._reported

    def count_redelivery(self, message: TaskMessage) -> int:
        """One more redelivery of this attempt seen here; how many so far."""
        key = (message.task_id, message.attempt)
        count = self._redelivered.get(key, 0) + 1
        _remember(self._redelivered, key, count)
        return count

    # ---------------------------------------------------------------- the orchestrator's word
    def expect_word(self, message: TaskMessage) -> asyncio.Future[bool]:
        """A future set True by a ``ProceedTask`` for this attempt, False by a
        ``CancelTask`` of it (or of its task); ``drop_word`` it when done."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._words.setdefault((message.task_id, message.attempt), set()).add(future)
        return future

    def drop_word(self, message: TaskMessage, future: asyncio.Future[bool]) -> None:
        key = (message.task_id, message.attempt)
        waiting = self._words.get(key)
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del self._words[key]

    def proceed(self, task_id: str, attempt_no: int) -> bool:
        """The orchestrator says: run it. False if nobody here waits for that."""
        return self._answer(task_id, attempt_no, True)

    def _answer(self, task_id: str, attempt_no: int | None, word: bool) -> bool:
        answered = False
        for (known_id, known_attempt), futures in list(self._words.items()):
            if known_id == task_id and attempt_no in (None, known_attempt):
                for future in futures:
                    if not future.done():
                        future.set_result(word)
                        answered = True
        return answered

    # ---------------------------------------------------------------- cancelled ids
    def cancel(self, task_id: str, attempt_no: int | None) -> None:
        """Skip the task if it arrives; stop its handler if it runs here; and
        answer a redelivery of it that waits for the orchestrator's word
        (``attempt_no`` None: any attempt)."""
        _remember(self._cancelled, (task_id, attempt_no), None)
        self._answer(task_id, attempt_no, False)
        for (known_id, known_attempt), attempt in list(self._known.items()):
            if attempt.ending:
                continue  # already reported; its handler was told to stop
            if known_id == task_id and attempt_no in (None, known_attempt):
                attempt.stop(StopReason.CANCELLED)

    def is_cancelled(self, message: TaskMessage) -> bool:
        return (message.task_id, None) in self._cancelled or (
            message.task_id,
            message.attempt,
        ) in self._cancelled

    # ---------------------------------------------------------------- retries to avoid
    def defer_once(self, message: TaskMessage) -> bool:
        """True the first AVOID_DEFERRALS times this attempt comes here; then it runs here."""
        key = (message.task_id, message.attempt)
        count = self._deferred.get(key, 0)
        if count >= AVOID_DEFERRALS:
            return False
        _remember(self._deferred, key, count + 1)
        _remember(self._stepped_aside, key, None)
        return True

    def came_back(self, message: TaskMessage) -> bool:
        """Whether this agent handed this attempt back last time it came (a step
        aside): then its redelivered flag is our own doing, not a sign that it
        may have run somewhere. Asked once per delivery."""
        key = (message.task_id, message.attempt)
        if key not in self._stepped_aside:
            return False
        del self._stepped_aside[key]
        return True


def _remember(memory: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    """Set ``key``, as the newest entry, and drop the oldest past ``MEMORY``."""
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > MEMORY:
        memory.popitem(last=False)
