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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from broker import BusError, TaskStarted

log = logging.getLogger(__name__)

FINAL_EVENT_WAIT = 2.0
"""A start not told when its attempt ended is told if the final event is not
confirmed within this many seconds (see ``StartNotice.settle``)."""


class StartNotice:
    """The ``TaskStarted`` of one attempt, sent after ``delay`` or when asked."""

    def __init__(
        self,
        event: TaskStarted,
        publish: Callable[[TaskStarted], Awaitable[None]],
        delay: float | None,
    ) -> None:
        self.event = event
        self._publish = publish
        self._sending: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done = False
        """It went out, or will never (folded into the final event, or dropped)."""
        if delay:
            self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    @property
    def at(self) -> float:
        return self.event.at

    @property
    def deferred(self) -> bool:
        """Not sent, and not being sent."""
        return self._sending is None and not self._done

    async def now(self) -> None:
        """Send it (once) and wait until it is confirmed. Raises ``BusError`` if
        it cannot be sent; a later call tries nothing again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sending is None:
            if self._done:
                return
            self._sending = asyncio.get_running_loop().create_task(self._send())
        await asyncio.shield(self._sending)

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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(FINAL_EVENT_WAIT, self._fire)

    def drop(self) -> None:
        """Its final event went out (or the attempt stopped before it ended, or
        will not be reported): a start not sent yet is never sent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._done = True

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
            event = self.event
            log.warning(
                "agent %s: task %s attempt %d: its start not reported: %s",
                event.agent_id,
                event.task_id,
                event.attempt,
                exc,
            )
