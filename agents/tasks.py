"""What an agent does with each task delivery: decide its ``Outcome``, running
the attempt when it is to run.

Deciding is all this module does about a delivery: the ``settle`` block the
agent handles it in (``agents.settle``) carries the outcome out, so every way
through here, the shortcuts included, ends in exactly one settling.

The shortcuts, in order: not a task message (dead-lettered); the agent stops
(given back); an attempt that runs or ran here (a duplicate, or a copy that
a lost link brought back); a cancelled task (skipped); a retry this agent was
asked to avoid (handed back). A delivery the broker marks redelivered may be
of an attempt that ended elsewhere (a crashed broker brings back messages
already acknowledged): it is run only once the orchestrator says so (a
``TaskAssigned`` with ``confirm``, answered by ``ProceedTask`` or
``CancelTask``), and past ``MAX_REDELIVERIES`` it is dead-lettered instead.
A first delivery pays no such round trip. Then it waits for a free slot
(saying ``TaskAssigned`` if it has to wait), and runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from broker import (
    BusError,
    CommunicationBus,
    InvalidMessage,
    TaskAssigned,
    TaskDelivery,
    TaskMessage,
    parse_task,
)

from .attempts import MAX_REDELIVERIES, Attempt, Attempts
from .handlers import Handlers, Runners
from .publishing import publish_event
from .running import Running
from .settle import Outcome, Settlement
from .started import StartClock

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)

CONFIRM_AGAIN = 30.0
"""A redelivery waiting for the orchestrator's word asks again this often (a
word lost on the way, an orchestrator that restarted meanwhile)."""
_NO_WORD = object()


class Tasks(Running):
    """The task deliveries of one agent, from its settings (``agent_id`` and
    ``long_task_after``, read when used), its handlers and the attempts it holds."""

    def __init__(
        self,
        agent: Agent,
        handlers: Handlers,
        runners: Runners,
        attempts: Attempts,
        halted: asyncio.Event,
    ) -> None:
        self._agent = agent
        self._handlers = handlers
        self._runners = runners
        self._attempts = attempts
        self._halted = halted
        self.bus: CommunicationBus | None = None
        """Set while the agent is started."""
        self._background: set[asyncio.Task[Any]] = set()
        self._clock = StartClock()
        """The timers of the attempts' start notices."""

    async def take(self, settlement: Settlement) -> Outcome:
        """What becomes of one delivery."""
        agent_id = self._agent.agent_id
        delivery = settlement.delivery
        try:
            message = parse_task(delivery.body)
        except InvalidMessage as exc:
            settlement.reason = f"agent {agent_id}: {exc}"
            return Outcome.DEAD_LETTER
        stepped_aside = self._attempts.came_back(message)
        if (outcome := await self._done_with(message)) is not None:
            return outcome
        if agent_id in message.avoid_agents and self._attempts.defer_once(message):
            return Outcome.STEP_ASIDE  # a retry after failing here: another agent may take it
        if delivery.redelivered and not stepped_aside:
            count = self._attempts.count_redelivery(message)
            if count > MAX_REDELIVERIES:
                settlement.reason = (
                    f"agent {agent_id}: task {message.task_id} attempt {message.attempt}"
                    f" delivered again {count} times without a final event"
                    f" (at most {MAX_REDELIVERIES})"
                )
                log.warning("%s: dead-lettered", settlement.reason)
                return Outcome.DEAD_LETTER
            word = await self._confirm(message, delivery)
            if word is None:
                return Outcome.REQUEUE  # the agent stops, or the link went with the delivery
            if not word:
                return Outcome.ACK  # ended, superseded or cancelled: the orchestrator said so
            if (outcome := await self._done_with(message)) is not None:
                return outcome
        if not self._attempts.slots.try_take():
            if not await self._wait_for_slot(message, delivery):
                return Outcome.REQUEUE
            if (outcome := await self._done_with(message)) is not None:
                self._attempts.slots.release()
                return outcome
        settlement.attempt = self._attempts.begin(message, delivery)
        return await self._attempt(settlement)

    async def told(self) -> None:
        """Until every attempt held here has told the orchestrator it runs (a
        start deferred is sent now) and every one that ended has its final event
        confirmed (``SyncReports``). Raises ``BusError`` if a start cannot go out:
        then nothing may be answered."""
        for _ in range(100):  # an attempt just taken makes its notice within a step
            held = [a for a in self._attempts.all() if a.decided is not None]
            if all(a.job is not None and a.notice is not None for a in held if a.counted):
                break
            await asyncio.sleep(0.01)
        waits: list[Awaitable[Any]] = []
        for attempt in self._attempts.all():
            decided = attempt.decided
            if decided is None or decided.done():
                continue
            if attempt.job is not None and not attempt.job.done():
                if attempt.notice is not None:
                    waits.append(attempt.notice.now())  # at once if told already
            else:
                waits.append(asyncio.shield(decided))  # ended: its report on the way
        await asyncio.gather(*waits)

    async def _done_with(self, message: TaskMessage) -> Outcome | None:
        """The outcome of a delivery that is not to run here (now), or None.

        Looked at again after each wait, as the answer may have changed since."""
        if self._halted.is_set():
            return Outcome.REQUEUE
        known = self._attempts.get(message)
        if known is not None:
            return await self._again(known)
        # (Another attempt of the same task still running or ending here is no
        # reason to drop this one: the orchestrator has moved on to it.)
        if self._attempts.was_reported(message):
            # Reported here already: its acknowledgement was lost with a link, or
            # a crashed broker brought it back.
            log.info(
                "agent %s: task %s attempt %d came again after it ended here: acknowledged",
                self._agent.agent_id,
                message.task_id,
                message.attempt,
            )
            return Outcome.ACK
        if self._attempts.is_cancelled(message):
            # Say so, so that the orchestrator stops telling new agents about it.
            with contextlib.suppress(BusError):
                assert self.bus is not None
                await publish_event(
                    self.bus,
                    self._final(message, "cancelled", "skipped: cancelled before it started"),
                )
            return Outcome.ACK
        return None

    async def _again(self, known: Attempt) -> Outcome:
        """A delivery of an attempt that runs here, or has ended here and is not
        settled yet."""
        original = known.delivery
        if known.detached or known.reported or original is None or not original.lost:
            # A duplicate of what runs here (its own delivery still held, or
            # acknowledged already), or one done with whose handler lingers (it
            # keeps its slot).
            return Outcome.ACK
        # Its own delivery went with a lost link, and the broker gave it back:
        # this copy is the one to settle, the way the attempt's end decides.
        log.info(
            "agent %s: task %s attempt %d came back after a lost link while it runs here",
            self._agent.agent_id,
            known.message.task_id,
            known.message.attempt,
        )
        assert known.decided is not None
        outcome: Outcome = await asyncio.shield(known.decided)
        return outcome

    async def _confirm(self, message: TaskMessage, delivery: TaskDelivery) -> bool | None:
        """Ask the orchestrator whether to run a redelivered attempt: True (run
        it), False (done with), None (the agent stops, or the delivery is lost,
        or the question cannot be sent: give it back)."""
        assert self.bus is not None
        word = self._attempts.expect_word(message)
        try:
            while True:
                try:
                    await publish_event(self.bus, self._assigned(message, confirm=True))
                except BusError as exc:
                    log.warning(
                        "agent %s: cannot ask about redelivered task %s: %s",
                        self._agent.agent_id,
                        message.task_id,
                        exc,
                    )
                    return None
                answer = await self._first(word, delivery, CONFIRM_AGAIN)
                if answer is not _NO_WORD:
                    return answer  # type: ignore[return-value]
        finally:
            self._attempts.drop_word(message, word)

    async def _wait_for_slot(self, message: TaskMessage, delivery: TaskDelivery) -> bool:
        """Every slot is held (by handlers that outlived a lost link, or that do
        not end): say the attempt is held here, and wait for one. False if the
        agent stops or the delivery is lost meanwhile."""
        slot = self._attempts.slots.ask()
        if not slot.done():
            with contextlib.suppress(BusError):
                assert self.bus is not None
                await publish_event(self.bus, self._assigned(message, confirm=False))
        await self._first(slot, delivery, None)
        if slot.done():
            return True  # (even if a stop came too: the caller looks again)
        self._attempts.slots.withdraw(slot)
        return False

    async def _first(
        self, future: asyncio.Future[Any], delivery: TaskDelivery, timeout: float | None
    ) -> Any:
        """``future``'s result once it is done; None if the agent stops or the
        delivery is lost first; ``_NO_WORD`` after ``timeout``."""
        stopping = asyncio.ensure_future(self._halted.wait())
        lost = asyncio.ensure_future(delivery.wait_lost())
        try:
            await asyncio.wait(
                [future, stopping, lost], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopping.cancel()
            lost.cancel()
        if future.done():
            return future.result()
        if self._halted.is_set() or delivery.lost:
            return None
        return _NO_WORD

    def _assigned(self, message: TaskMessage, *, confirm: bool) -> TaskAssigned:
        return TaskAssigned(
            task_id=message.task_id,
            attempt=message.attempt,
            agent_id=self._agent.agent_id,
            confirm=confirm,
        )
