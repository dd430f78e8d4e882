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
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from broker import (
    BusError,
    CommunicationBus,
    InvalidMessage,
    MessageTooLarge,
    TaskAssigned,
    TaskDelivery,
    TaskFinished,
    TaskMessage,
    TaskProgress,
    parse_task,
    task_message_id,
    tracing,
)
from broker.log_records import agent_id_var, task_id_var

from .attempts import MAX_REDELIVERIES, Attempt, Attempts, StopReason
from .context import TaskContext
from .handlers import Handlers, Runners, Stopped, bounded
from .publishing import publish_event
from .settle import Outcome, Settlement
from .started import StartClock, StartNotice

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)

CONFIRM_AGAIN = 30.0
"""A redelivery waiting for the orchestrator's word asks again this often (a
word lost on the way, an orchestrator that restarted meanwhile)."""
SHORT_ERROR_CHARS = 1024
"""What is kept of an error whose final event was too large to send."""
_NO_WORD = object()


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

    # ------------------------------------------------------------------ running

    async def _attempt(self, settlement: Settlement) -> Outcome:
        """Run an attempt and report its end; the outcome is the attempt's
        ``decided`` too (for a copy of it that a lost link brought back)."""
        attempt = settlement.attempt
        assert attempt is not None and attempt.decided is not None
        outcome = Outcome.REQUEUE
        try:
            outcome = await self._run_and_report(attempt, settlement)
            return outcome
        finally:
            if not attempt.decided.done():
                attempt.decided.set_result(outcome)

    async def _run_and_report(self, attempt: Attempt, settlement: Settlement) -> Outcome:
        # What is logged from here on (the handler's own records too) names the task,
        # and when tracing, the handler and its final event join the task's trace.
        # (``about``'s context variables, set here without its generator: once per attempt.)
        message = attempt.message
        task_token = task_id_var.set(message.task_id)
        agent_token = agent_id_var.set(self._agent.agent_id)
        try:
            if not tracing.active():  # (what the span would be named is not made)
                return await self._run_and_report_in_context(attempt, settlement)
            with tracing.task_process_span(
                self.bus.topology if self.bus is not None else None,
                getattr(settlement.delivery, "trace", None),
                settlement.delivery.queue_key,
                message_id=task_message_id(message.task_id, message.attempt),
                attributes={"task.type": message.task_type, "agent.id": self._agent.agent_id},
            ):
                return await self._run_and_report_in_context(attempt, settlement)
        finally:
            agent_id_var.reset(agent_token)
            task_id_var.reset(task_token)

    async def _run_and_report_in_context(self, attempt: Attempt, settlement: Settlement) -> Outcome:
        """Run the attempt, then report it.

        The run (say it started, run the handler, make the final event) goes on
        in this task, the one that handles the delivery, not in a task of its
        own: ``attempt.job`` is a future that stands for it, done with the
        final event when the run ends, or cancelled to stop it (``Attempt.stop``).
        Every wait of the run ends as soon as it is cancelled, as a cancelled
        task's would (``Stopped``), and the report, which must not be stopped,
        follows in the same task."""
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
