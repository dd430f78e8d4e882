"""When an agent says an attempt started: at once, or only if it outlasts a
short delay.

Most tasks end within milliseconds of their start, and a ``TaskStarted`` for
each is a publish (and a confirm, and an event for the orchestrator to handle)
that tells nothing the final event could not: the final event carries
``started_at``. So an attempt's start is told ``delay`` seconds after it
began, unless its final event goes out first; then only the final event does.
What is given up is at most ``delay`` of the orchestrator not knowing that
the attempt runs: its run deadline is counted from the start it is told,
and the agent's own timeout of the handler from the real start.

It is told at once: when the delay is None (or 0); before a handler's first
progress report (the orchestrator keeps progress only of a running task, so
the start goes out first, and is confirmed first); and where the caller asks
for it (a long task, acknowledged once it started; a redelivery, whose starts
the orchestrator counts to give up on a message that keeps coming back).

The delays of all of an agent's attempts run on one timer per delay
(``StartClock``) rather than on two event-loop timers per attempt, each
armed and then called off within milliseconds, as most attempts end first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from broker import BusError, TaskStarted

log = logging.getLogger(__name__)

FINAL_EVENT_WAIT = 2.0
"""A start not told when its attempt ended is told if the final event is not
confirmed within this many seconds (see ``StartNotice.settle``)."""
TICK = 0.005
"""How much later than due a start may be told, so that one timer tells every
start due within it (rather than one timer per attempt)."""


class _Due:
    """Callbacks each due a fixed ``delay`` after it was added, on one timer.

    Added in time order with one delay, they fall due in the order they were
    added: a queue, whose head the timer is armed for, rather than a timer
    of the event loop per attempt (most are called off within milliseconds,
    their attempt ended). An entry called off stays in the queue, inert, until
    it reaches the head: at most ``delay`` later."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._loop = loop
        self._delay = delay
        self._queue: deque[list] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, fire: Callable[[], None]) -> list:
        """``fire()`` once the delay is up; set the entry's [1] to None to call it off."""
        entry = [self._loop.time() + self._delay, fire]
        self._queue.append(entry)
        if self._timer is None:
            self._timer = self._loop.call_at(entry[0], self._run)
        return entry

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()

    def _run(self) -> None:
        self._timer = None
        queue = self._queue
        now = self._loop.time()
        while queue and (queue[0][1] is None or queue[0][0] <= now):
            fire = queue.popleft()[1]
            if fire is not None:
                fire()
        if queue:
            self._timer = self._loop.call_at(max(queue[0][0], now + TICK), self._run)


class StartClock:
    """The timers of one agent's start notices: one ``_Due`` per delay (the
    agent's ``report_started_after``, and ``FINAL_EVENT_WAIT``), on the loop
    the agent runs on now (a stopped agent may be started on another)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._by_delay: dict[float, _Due] = {}

    def after(self, delay: float, fire: Callable[[], None]) -> list:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self.close()
            self._loop = loop
        due = self._by_delay.get(delay)
        if due is None:
            due = self._by_delay[delay] = _Due(loop, delay)
        return due.add(fire)

    def close(self) -> None:
        """Nothing is told any more (the agent stops)."""
        for due in self._by_delay.values():
            due.close()
        self._by_delay.clear()
        self._loop = None


class StartNotice:
    """The ``TaskStarted`` of one attempt, sent after ``delay`` or when asked.

    The event is made only when it is sent: most never are."""

    def __init__(
        self,
        task_id: str,
        attempt: int,
        agent_id: str,
        publish: Callable[[TaskStarted], Awaitable[None]],
        delay: float | None,
        clock: StartClock,
    ) -> None:
        self.at = time.time()
        """When the attempt started (its ``TaskStarted``'s ``at``, and its final event's ``started_at``)."""
        self._task_id = task_id
        self._attempt = attempt
        self._agent_id = agent_id
        self._publish = publish
        self._clock = clock
        self._sending: asyncio.Task[None] | None = None
        self._timer: list | None = None
        """Its entry in the clock, while one is due."""
        self._done = False
        """It went out, or will never (folded into the final event, or dropped)."""
        if delay:
            self._timer = clock.after(delay, self._fire)

    @property
    def event(self) -> TaskStarted:
        return TaskStarted(
            task_id=self._task_id, attempt=self._attempt, agent_id=self._agent_id, at=self.at
        )

    @property
    def deferred(self) -> bool:
        """Not sent, and not being sent."""
        return self._sending is None and not self._done

    async def now(self) -> None:
        """Send it (once) and wait until it is confirmed. Raises ``BusError`` if
        it cannot be sent; a later call tries nothing again."""
        sending = self.sending()
        if sending is not None:
            await asyncio.shield(sending)

    def sending(self) -> asyncio.Task[None] | None:
        """Send it (once): what sends it (done once confirmed), None if it will never go."""
        self._call_off()
        if self._sending is None:
            if self._done:
                return None
            self._sending = asyncio.get_running_loop().create_task(self._send())
        return self._sending

    def being_sent(self) -> asyncio.Task[None] | None:
        """What sends it, if it is being sent (or was)."""
        return self._sending

    async def settle(self) -> None:
        """The attempt has ended and its final event is about to go: a start
        being sent is waited for, so that the final event comes after it. Never
        raises ``BusError`` (the final event still goes).

        A start not sent yet goes after all if the final event is not confirmed
        within ``FINAL_EVENT_WAIT`` (a final event that hangs must not leave the
        attempt unseen, without a run deadline); ``drop`` it once it is. Under
        load a confirm takes longer than the delay, hence a wait of its own:
        the orchestrator ignores a start its agent tells after the end."""
        if self._sending is not None:
            with contextlib.suppress(BusError):
                await asyncio.shield(self._sending)
            return
        self.settle_later()

    def settle_later(self) -> None:
        """``settle`` for a start that is not being sent (nothing to wait for)."""
        if self._timer is not None:
            self._call_off()
            self._timer = self._clock.after(FINAL_EVENT_WAIT, self._fire)

    def drop(self) -> None:
        """Its final event went out (or the attempt stopped before it ended, or
        will not be reported): a start not sent yet is never sent."""
        self._call_off()
        self._done = True

    def _call_off(self) -> None:
        if self._timer is not None:
            self._timer[1] = None
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        if self._sending is None and not self._done:
            self._sending = asyncio.get_running_loop().create_task(self._send())
            self._sending.add_done_callback(self._retrieve)

    async def _send(self) -> None:
        try:
            await self._publish(self.event)
        finally:
            self._done = True

    def _retrieve(self, job: asyncio.Task[None]) -> None:
        """A start sent by the timer that could not go out is logged; the final
        event carries ``started_at`` anyway."""
        if not job.cancelled() and (exc := job.exception()) is not None:
            log.warning(
                "agent %s: task %s attempt %d: its start not reported: %s",
                self._agent_id,
                self._task_id,
                self._attempt,
                exc,
            )
