"""The one place an agent settles a task delivery (as aio-pika's ``message.process()``).

Each delivery is handled inside ``async with deliveries.settle(...)``; the
handling decides an ``Outcome``, and the block's end carries it out, once,
even when the handling fails. The final event of an attempt is published
(and confirmed) inside the block, before the delivery is acknowledged, so a
crash at any point leaves the task to be run again rather than lost. And
``Deliveries`` knows which deliveries are still held, so that a stop waits for
them to be settled before the channel closes (which would hand back a task
already reported, to run again).

An attempt that ran is settled with its bookkeeping, in this order: its
handler has really ended (``Attempts.end``), it is no longer counted running,
then it is settled, and it is forgotten before a requeue (the same attempt
must run again when it comes back) but only after an ack (until then a
redelivery of it is a duplicate; after that, the memory of attempts
reported here says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from types import TracebackType
from typing import Any

from broker import BusError, TaskConsumer, TaskDelivery

from .attempts import Attempt, Attempts

AVOID_PAUSE = 0.05
"""How long an agent asked to avoid a retry holds it before handing it back,
so that another agent with a free slot takes it instead."""


class Outcome(enum.Enum):
    """What becomes of a delivery (not to be confused with a task's outcome,
    ``broker.messages.Outcome``, which an ``ACK`` may follow any of)."""

    ACK = "ack"
    """Done with: reported (now or before), a duplicate of an attempt known
    here, skipped as cancelled, ended as the orchestrator says (a redelivery
    it answered with a cancel), or re-published by the orchestrator
    (unregistered)."""
    REQUEUE = "requeue"
    """To run again: the agent stops, or the final event did not go out. Also
    what a handling that failed leaves, as a lost channel would."""
    DEAD_LETTER = "dead_letter"
    """Not a task message (no agent could run it), or an attempt that came
    back too often without a final event."""
    STEP_ASIDE = "step_aside"
    """A retry this agent was asked to avoid: given back, and its queue left
    alone for ``AVOID_PAUSE`` so that another agent takes it."""


class Settlement:
    """One delivery being handled: set ``outcome`` (and ``reason`` for a dead
    letter, ``attempt`` once it runs) in the block; its end settles it."""

    def __init__(self, delivery: TaskDelivery, consumer: TaskConsumer, owner: Deliveries) -> None:
        self.delivery = delivery
        self.outcome = Outcome.REQUEUE  # until decided: a handling that raised runs again
        self.reason = ""
        self.attempt: Attempt | None = None
        self._consumer = consumer
        self._owner = owner
        self._detaching: asyncio.Future[None] | None = None
        self._settled: asyncio.Future[None] | None = None
        """Made when someone waits for the settling (``Deliveries.pending``: a stop)."""

    def detach(self) -> asyncio.Future[None]:
        """Acknowledge the delivery now, keeping its place in the prefetch until
        the block ends (a task longer than the broker lets a delivery stay
        unacknowledged). Marked at once and run on its own, so that a cancel of
        the attempt neither leaves it half done nor races its settling."""
        assert self.attempt is not None
        self.attempt.detached = True
        self._detaching = asyncio.ensure_future(self._consumer.detach(self.delivery))
        return self._detaching

    async def __aenter__(self) -> Settlement:
        self._owner._unsettled.add(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        attempts = self._owner.attempts
        attempt = self.attempt
        try:
            if attempt is not None:
                if attempt.decided is not None and not attempt.decided.done():
                    attempt.decided.set_result(self.outcome)  # a handling that raised
                await attempts.end(attempt)
                attempts.uncount(attempt)
                if attempt.detached or self.outcome is not Outcome.ACK:
                    attempts.forget(attempt)
            await self._carry_out()
        finally:
            if attempt is not None:
                attempts.forget(attempt)
            self._owner._unsettled.discard(self)
            if self._settled is not None:
                self._settled.set_result(None)

    def settled(self) -> asyncio.Future[None]:
        """A future done once this delivery is settled (asked while it is not)."""
        if self._settled is None:
            self._settled = asyncio.get_running_loop().create_future()
        return self._settled

    async def _carry_out(self) -> None:
        if self.attempt is not None and self.attempt.detached:
            # Acknowledged already, it is in no queue to go back to: whatever
            # the outcome, its place in the prefetch is free again. (One the
            # agent stopped is re-published by the orchestrator.)
            if self._detaching is not None:
                await asyncio.wait([self._detaching])
            with contextlib.suppress(BusError):
                await self._consumer.reattach()
        elif self.outcome is Outcome.ACK:
            await self.delivery.ack()
        elif self.outcome is Outcome.REQUEUE:
            await self.delivery.requeue()
        elif self.outcome is Outcome.DEAD_LETTER:
            await self.delivery.dead_letter(self.reason)
        else:
            await self._consumer.step_aside(self.delivery, AVOID_PAUSE)


class Deliveries:
    """The deliveries an agent received and has not settled yet."""

    def __init__(self, attempts: Attempts) -> None:
        self.attempts = attempts
        self._unsettled: set[Settlement] = set()

    def settle(self, delivery: TaskDelivery, consumer: TaskConsumer) -> Settlement:
        """``async with deliveries.settle(delivery, consumer) as settlement:``"""
        return Settlement(delivery, consumer, self)

    def __len__(self) -> int:
        return len(self._unsettled)

    def pending(self) -> list[asyncio.Future[Any]]:
        """One future per delivery not settled yet, done once it is."""
        return [settlement.settled() for settlement in self._unsettled]
