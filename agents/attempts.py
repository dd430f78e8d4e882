"""The attempts an agent holds, and what it remembers of those it will not run.

An attempt (a task id and an attempt number) is known here from the moment its
delivery is taken until that delivery is settled: while its handler runs, and
after it ended (reported, or to be run again), marked ending, until then. So a
redelivery of a known attempt (the broker hands a delivery back when the
channel that had it is lost) is taken for the duplicate it is, rather than run
beside its handler; another attempt of the same task is no duplicate: the
orchestrator has moved on to it.

The agent also remembers the tasks it was told are cancelled, to skip them
when they arrive, and how often it handed back each retry it was asked to
avoid. Both memories are bounded: an agent runs for months.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from broker import TaskMessage

log = logging.getLogger(__name__)

MEMORY = 10_000
"""How many cancelled ids, and how many deferred retries, an agent remembers."""
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
    job: asyncio.Task[Any] | None = None
    """What runs the attempt: says it started, runs the handler, makes the
    final event. Cancelled to stop the attempt (``stop``)."""
    stop_reason: StopReason | None = None
    handler: asyncio.Future[Any] | None = None
    """Done when the handler has really ended (see ``agents.handlers``)."""
    detached: bool = False
    """Acknowledged when it started (a long task): see ``Settlement.detach``."""
    ending: bool = False
    """It has ended here (reported, or to be run again); its delivery is not
    settled yet."""
    counted: bool = True
    """Counted in ``AgentCounters.running``."""

    @property
    def key(self) -> tuple[str, int]:
        return (self.message.task_id, self.message.attempt)

    def stop(self, reason: StopReason) -> None:
        """Cancel its job; the first reason given is the one that counts."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.job is not None:
            self.job.cancel()


class Attempts:
    """The attempts known here, by task id and attempt number."""

    def __init__(self, agent_id: str, counters: AgentCounters, halted: asyncio.Event) -> None:
        self._agent_id = agent_id
        self._counters = counters
        self._halted = halted
        """Set while the agent stops: then nothing waits for a handler's end."""
        self._known: dict[tuple[str, int], Attempt] = {}
        self._cancelled: OrderedDict[tuple[str, int | None], None] = OrderedDict()
        self._deferred: OrderedDict[tuple[str, int], int] = OrderedDict()

    # ---------------------------------------------------------------- known here
    def __contains__(self, message: TaskMessage) -> bool:
        return (message.task_id, message.attempt) in self._known

    def keys(self) -> frozenset[tuple[str, int]]:
        return frozenset(self._known)

    def all(self) -> list[Attempt]:
        return list(self._known.values())

    @property
    def running(self) -> int:
        """Those whose handler has not ended here (what a heartbeat tells)."""
        return sum(1 for attempt in self._known.values() if not attempt.ending)

    def begin(self, message: TaskMessage) -> Attempt:
        attempt = Attempt(message)
        self._known[attempt.key] = attempt
        counters = self._counters
        counters.received += 1
        counters.running += 1
        counters.max_running = max(counters.max_running, counters.running)
        return attempt

    def count_end(self, outcome: str) -> None:
        """Count how an attempt run here ended (a ``timeout`` as ``timed_out``)."""
        name = "timed_out" if outcome == "timeout" else outcome
        setattr(self._counters, name, getattr(self._counters, name) + 1)

    def jobs(self) -> list[asyncio.Task[Any]]:
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

    def forget(self, attempt: Attempt) -> None:
        """No longer known here (and no longer counted). Idempotent."""
        self.uncount(attempt)
        if self._known.get(attempt.key) is attempt:  # not a redelivery's, run since
            del self._known[attempt.key]

    # ---------------------------------------------------------------- cancelled ids
    def cancel(self, task_id: str, attempt_no: int | None) -> None:
        """Skip the task if it arrives; stop its handler if it runs here
        (``attempt_no`` None: any attempt)."""
        self._cancelled[(task_id, attempt_no)] = None
        while len(self._cancelled) > MEMORY:
            self._cancelled.popitem(last=False)
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
        self._deferred[key] = count + 1
        while len(self._deferred) > MEMORY:
            self._deferred.popitem(last=False)
        return True
