"""How an agent runs an attempt and reports its end (``Running``, mixed into
``agents.tasks.Tasks``, which decides whether a delivery runs at all).

The run (say it started, run the handler, make the final event) goes on in
the task that handles the delivery, not in a task of its own: a task more
per attempt, and its steps, would be most of what a quick task costs the
agent. ``Attempt.job`` is a future that stands for the run: done with the
final event when it ends, or cancelled to stop it (``Attempt.stop``). Every
wait of the run ends as soon as it is cancelled, as a cancelled task's would
(``Stopped``), and the report, which must not be stopped, follows in the
same task. What a handler's run is and how it is stopped is
``agents.handlers``; when the start is told, ``agents.started``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from broker import (
    BusError,
    CommunicationBus,
    MessageTooLarge,
    TaskFinished,
    TaskMessage,
    TaskProgress,
    task_message_id,
    tracing,
)
from broker.log_records import agent_id_var, task_id_var

from .attempts import Attempt, Attempts, StopReason
from .context import TaskContext
from .handlers import Handlers, Runners, Stopped, bounded
from .publishing import publish_event
from .settle import Outcome, Settlement
from .started import StartClock, StartNotice

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)

SHORT_ERROR_CHARS = 1024
"""What is kept of an error whose final event was too large to send."""


class Running:
    """Running attempts, for ``Tasks``: the attributes below are its."""

    _agent: Agent
    _handlers: Handlers
    _runners: Runners
    _attempts: Attempts
    _clock: StartClock
    _background: set[asyncio.Task[Any]]
    bus: CommunicationBus | None

    async def _attempt(self, settlement: Settlement) -> Outcome:
        """Run an attempt and report its end; the outcome is the attempt's
        ``decided`` too (for a copy of it that a lost link brought back)."""
        attempt = settlement.attempt
        assert attempt is not None and attempt.decided is not None
        outcome = Outcome.REQUEUE
        # What is logged from here on (the handler's own records too) names the task,
        # and when tracing, the handler and its final event join the task's trace.
        # (``about``'s context variables, set here without its generator: once per attempt.)
        message = attempt.message
        task_token = task_id_var.set(message.task_id)
        agent_token = agent_id_var.set(self._agent.agent_id)
        try:
            if not tracing.active():  # (what the span would be named is not made)
                outcome = await self._run_and_report_in_context(attempt, settlement)
                return outcome
            with tracing.task_process_span(
                self.bus.topology if self.bus is not None else None,
                getattr(settlement.delivery, "trace", None),
                settlement.delivery.queue_key,
                message_id=task_message_id(message.task_id, message.attempt),
                attributes={"task.type": message.task_type, "agent.id": self._agent.agent_id},
            ):
                outcome = await self._run_and_report_in_context(attempt, settlement)
                return outcome
        finally:
            agent_id_var.reset(agent_token)
            task_id_var.reset(task_token)
            if not attempt.decided.done():
                attempt.decided.set_result(outcome)

    async def _run_and_report_in_context(self, attempt: Attempt, settlement: Settlement) -> Outcome:
        """Run the attempt (see the module's docstring), then report it."""
        assert self.bus is not None
        job: asyncio.Future[TaskFinished] = asyncio.get_running_loop().create_future()
        attempt.job = job
        try:
            try:
                finished = await self._run(settlement, job)
            except Stopped:
                pass  # the job is cancelled
            except Exception as exc:
                if not job.done():
                    job.set_exception(exc)
            except BaseException:  # this task itself is cancelled (the event loop closes)
                job.cancel()
                raise
            else:
                job.set_result(finished)  # (not stopped: ``_run`` looked after its last wait)
            return await self._report(attempt, job)
        finally:
            if attempt.notice is not None:
                attempt.notice.drop()  # reported, or never to be

    async def _report(self, attempt: Attempt, job: asyncio.Future[TaskFinished]) -> Outcome:
        """Publish the final event of a run that has ended (``job`` is done)."""
        assert self.bus is not None
        try:
            if not job.cancelled():
                finished: TaskFinished = job.result()
            elif attempt.stop_reason is StopReason.CANCELLED:
                # Cancelled on request, maybe before its handler was waited for
                # (while it said it started): reported cancelled, as a skipped one is.
                finished = self._final(attempt.message, "cancelled", "cancelled by request")
            else:
                # Stopped before it ended (a stop it outlived, or unregistered): not
                # reported. A job that did end is reported, even if a stop came since.
                if attempt.stop_reason is StopReason.UNREGISTERED:
                    return Outcome.ACK  # the orchestrator has re-published it
                return Outcome.REQUEUE
            self._log_end(attempt, finished)
            # Counted before it goes out: who hears of its end may look at the counters.
            self._attempts.count_end(finished.outcome)
            await self._publish_final(attempt, finished)
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
        self._attempts.reported(attempt)
        return Outcome.ACK

    async def _publish_final(self, attempt: Attempt, finished: TaskFinished) -> TaskFinished:
        """Publish the final event; one too large to send is replaced by one that
        says so (a result too large fails the attempt, naming the size and the
        limit). What was published."""
        assert self.bus is not None
        try:
            await publish_event(self.bus, finished)
            return finished
        except MessageTooLarge as exc:
            smaller = self._fitting(finished, exc)
        self._attempts.count_end(finished.outcome, -1)
        self._attempts.count_end(smaller.outcome)
        message = attempt.message
        log.warning(
            "agent %s: task %s (type %s) attempt %d: its final event (%s) is too large"
            " to send: %s; reported %s",
            self._agent.agent_id,
            message.task_id,
            message.task_type,
            message.attempt,
            finished.outcome,
            smaller.error,
            smaller.outcome,
        )
        await publish_event(self.bus, smaller)  # too large still: a BusError, given back
        return smaller

    def _fitting(self, finished: TaskFinished, exc: MessageTooLarge) -> TaskFinished:
        if finished.outcome == "completed":
            outcome, error = "failed", f"the handler's result is too large to send: {exc}"
        else:
            outcome = finished.outcome
            error = (
                bounded(finished.error or "", SHORT_ERROR_CHARS)
                + f" (its traceback was dropped: {exc})"
            )
        return finished.model_copy(
            update={"outcome": outcome, "error": error, "result": None, "traceback": None}
        )

    def _log_end(self, attempt: Attempt, finished: TaskFinished) -> None:
        """A failed or timed-out attempt is logged, with where its handler broke."""
        if finished.outcome not in ("failed", "timeout"):
            return
        message = attempt.message
        trace = attempt.trace
        if trace and finished.outcome == "timeout":
            trace = "its handler was at:\n" + trace
        log.warning(
            "agent %s: task %s (type %s) attempt %d %s: %s%s",
            self._agent.agent_id,
            message.task_id,
            message.task_type,
            message.attempt,
            "failed" if finished.outcome == "failed" else "timed out",
            finished.error,
            "\n" + trace.rstrip("\n") if trace else "",
        )

    async def _run(self, settlement: Settlement, job: asyncio.Future[Any]) -> TaskFinished:
        """Say the attempt started (now, or once it outlasts the agent's
        ``report_started_after``: see ``agents.started``), run its handler, and
        make its final event, which says when it started. Raises ``Stopped``
        once ``job`` is cancelled (looked at after each wait)."""
        attempt = settlement.attempt
        assert attempt is not None and self.bus is not None
        message = attempt.message
        agent = self._agent
        agent_id = agent.agent_id
        long_task_after = agent.long_task_after
        long_task = long_task_after is not None and message.timeout > long_task_after
        # A long task is acknowledged once the orchestrator knows it runs here;
        # the starts of a redelivery are counted by the orchestrator (a message
        # that keeps coming back, killing its agents, is given up): told at once.
        at_once = long_task or settlement.delivery.redelivered
        delay = agent.report_started_after
        notice = attempt.notice = StartNotice(
            message.task_id,
            message.attempt,
            agent_id,
            partial(publish_event, self.bus),
            None if at_once else delay,
            self._clock,
        )
        try:
            if at_once or not delay:
                # Confirmed before the handler starts: the orchestrator sees events in order.
                await _unless_stopped(notice.sending(), job)
            if long_task:
                # The orchestrator knows it runs here, and will re-publish it if we vanish.
                await _unless_stopped(settlement.detach(), job)  # never half done
            handler = self._handlers.find(message.task_type)
            if handler is None:
                error = f"agent {agent_id} has no handler for task_type {message.task_type!r}"
                await _settle(notice, job)
                return self._final(message, "failed", error, started_at=notice.at)
            loop = asyncio.get_running_loop()
            ctx = TaskContext(message, agent_id, self._progress(message, notice), loop)
            run = self._runners.start(handler, ctx)
            attempt.handler = run.future
            end = await run.wait(message.timeout, job)
            attempt.trace = end.traceback
            await _settle(notice, job)
        except BaseException:
            notice.drop()  # stopped before it ended: not reported
            raise
        return self._final(
            message,
            end.outcome,
            end.error,
            end.result,
            traceback=end.traceback if end.outcome == "failed" else None,
            started_at=notice.at,
        )

    def _final(
        self,
        message: TaskMessage,
        outcome: str,
        error: str | None,
        result: Any = None,
        *,
        traceback: str | None = None,
        started_at: float | None = None,
    ) -> TaskFinished:
        return TaskFinished(
            task_id=message.task_id,
            attempt=message.attempt,
            agent_id=self._agent.agent_id,
            outcome=outcome,  # type: ignore[arg-type]
            result=result,
            error=error,
            traceback=traceback,
            started_at=started_at,
        )

    def _progress(self, message: TaskMessage, notice: StartNotice) -> Callable[[float], None]:
        """How a handler's ``ctx.progress`` reaches the bus: in the background,
        lost quietly (a progress report is transient), after the attempt's
        start (the orchestrator keeps the progress of a running task only)."""

        def report(fraction: float) -> None:
            event = TaskProgress(
                task_id=message.task_id,
                attempt=message.attempt,
                agent_id=self._agent.agent_id,
                progress=fraction,
            )
            job = asyncio.get_running_loop().create_task(self._send_quietly(event, notice))
            self._background.add(job)  # held, so that it is not collected
            job.add_done_callback(self._background.discard)

        return report

    async def _send_quietly(self, event: TaskProgress, notice: StartNotice) -> None:
        if self.bus is None:
            return
        try:
            await notice.now()
            await publish_event(self.bus, event)
        except BusError as exc:
            log.debug("progress not sent: %s", exc)


def _retrieve(waited: asyncio.Future[Any]) -> None:
    if not waited.cancelled():
        waited.exception()


async def _unless_stopped(waited: asyncio.Future[Any] | None, job: asyncio.Future[Any]) -> None:
    """Wait for ``waited`` (None: nothing to wait for) as a step of the run of
    ``job``: raise ``Stopped`` as soon as ``job`` is cancelled (``waited``
    goes on, its end unheard), else what ``waited`` raised."""
    if waited is not None and not waited.done():
        await asyncio.wait([waited, job], return_when=asyncio.FIRST_COMPLETED)
    if job.cancelled():
        if waited is not None:
            waited.add_done_callback(_retrieve)
        raise Stopped
    if waited is not None:
        waited.result()


async def _settle(notice: StartNotice, job: asyncio.Future[Any]) -> None:
    """``notice.settle()`` as a step of the run of ``job`` (see ``_unless_stopped``)."""
    sending = notice.being_sent()
    if sending is None:
        notice.settle_later()
        return
    with contextlib.suppress(BusError):
        await _unless_stopped(sending, job)
