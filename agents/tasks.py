"""What an agent does with each task delivery: decide its ``Outcome``, running
the attempt when it is to run.

Deciding is all this module does about a delivery: the ``settle`` block the
agent handles it in (``agents.settle``) carries the outcome out, so every way
through here, the shortcuts included, ends in exactly one settling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker import (
    BusError,
    CommunicationBus,
    InvalidMessage,
    TaskFinished,
    TaskMessage,
    TaskProgress,
    TaskStarted,
    parse_task,
)

from .attempts import Attempts, StopReason
from .context import TaskContext
from .handlers import Handlers, Runners
from .settle import Outcome, Settlement

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)


class Tasks:
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

    async def take(self, settlement: Settlement) -> Outcome:
        """What becomes of one delivery."""
        agent_id = self._agent.agent_id
        try:
            message = parse_task(settlement.delivery.body)
        except InvalidMessage as exc:
            settlement.reason = f"agent {agent_id}: {exc}"
            return Outcome.DEAD_LETTER
        if self._halted.is_set():
            return Outcome.REQUEUE
        if message in self._attempts:
            return Outcome.ACK  # a duplicate of what runs here
        # (Another attempt of the same task still running or ending here is no
        # reason to drop this one: the orchestrator has moved on to it.)
        if self._attempts.is_cancelled(message):
            # Say so, so that the orchestrator stops telling new agents about it.
            with contextlib.suppress(BusError):
                assert self.bus is not None
                await self.bus.publish_event(
                    self._final(message, "cancelled", "skipped: cancelled before it started")
                )
            return Outcome.ACK
        if agent_id in message.avoid_agents and self._attempts.defer_once(message):
            return Outcome.STEP_ASIDE  # a retry after failing here: another agent may take it
        settlement.attempt = self._attempts.begin(message)
        return await self._attempt(settlement)

    async def _attempt(self, settlement: Settlement) -> Outcome:
        """Run an attempt and report its end."""
        attempt = settlement.attempt
        assert attempt is not None and self.bus is not None
        job = attempt.job = asyncio.get_running_loop().create_task(self._run(settlement))
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await job
            if not job.cancelled():
                finished: TaskFinished = job.result()
            elif attempt.stop_reason is StopReason.CANCELLED:
                # Cancelled on request, maybe before its handler was waited for
                # (while it said it started): reported cancelled, as a skipped one is.
                finished = self._counted(attempt.message, "cancelled", "cancelled by request")
            else:
                # Stopped before it ended (a stop it outlived, or unregistered): not
                # reported. A job that did end is reported, even if a stop came since.
                if attempt.stop_reason is StopReason.UNREGISTERED:
                    return Outcome.ACK  # the orchestrator has re-published it
                return Outcome.REQUEUE
            await self.bus.publish_event(finished)
        except BusError as exc:
            # The final event did not go out: the task must run again. Requeue it;
            # if the channel is gone, the broker has already given it back. One
            # acknowledged early is retried by the orchestrator's run deadline.
            log.error(
                "agent %s: task %s not reported: %s",
                self._agent.agent_id,
                attempt.message.task_id,
                exc,
            )
            return Outcome.REQUEUE
        return Outcome.ACK

    async def _run(self, settlement: Settlement) -> TaskFinished:
        """Say the attempt started, run its handler, and make its final event."""
        attempt = settlement.attempt
        assert attempt is not None and self.bus is not None
        message = attempt.message
        agent_id = self._agent.agent_id
        # Confirmed before the handler starts: the orchestrator sees events in order.
        await self.bus.publish_event(
            TaskStarted(task_id=message.task_id, attempt=message.attempt, agent_id=agent_id)
        )
        long_task_after = self._agent.long_task_after
        if long_task_after is not None and message.timeout > long_task_after:
            # The orchestrator knows it runs here, and will re-publish it if we vanish.
            await asyncio.shield(settlement.detach())  # never half done
        handler = self._handlers.find(message.task_type)
        if handler is None:
            error = f"agent {agent_id} has no handler for task_type {message.task_type!r}"
            return self._counted(message, "failed", error)
        loop = asyncio.get_running_loop()
        ctx = TaskContext(message, agent_id, self._progress(message), loop)
        run = self._runners.start(handler, ctx)
        attempt.handler = run.future
        end = await run.wait(message.timeout)
        return self._counted(message, end.outcome, end.error, end.result)

    def _counted(
        self, message: TaskMessage, outcome: str, error: str | None, result: Any = None
    ) -> TaskFinished:
        """The final event of an attempt run here, counted in the agent's counters."""
        self._attempts.count_end(outcome)
        return self._final(message, outcome, error, result)

    def _final(
        self, message: TaskMessage, outcome: str, error: str | None, result: Any = None
    ) -> TaskFinished:
        return TaskFinished(
            task_id=message.task_id,
            attempt=message.attempt,
            agent_id=self._agent.agent_id,
            outcome=outcome,  # type: ignore[arg-type]
            result=result,
            error=error,
        )

    def _progress(self, message: TaskMessage) -> Callable[[float], None]:
        """How a handler's ``ctx.progress`` reaches the bus: in the background,
        lost quietly (a progress report is transient)."""

        def report(fraction: float) -> None:
            event = TaskProgress(
                task_id=message.task_id,
                attempt=message.attempt,
                agent_id=self._agent.agent_id,
                progress=fraction,
            )
            job = asyncio.get_running_loop().create_task(self._send_quietly(event))
            self._background.add(job)  # held, so that it is not collected
            job.add_done_callback(self._background.discard)

        return report

    async def _send_quietly(self, event: TaskProgress) -> None:
        if self.bus is None:
            return
        try:
            await self.bus.publish_event(event)
        except BusError as exc:
            log.debug("progress not sent: %s", exc)
