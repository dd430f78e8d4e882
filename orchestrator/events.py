"""The orchestrator's handlers of what agents report, and of dead letters.

Every handler is idempotent, keyed by (task id, attempt): events come twice
after a reconnect, late, and out of order, and only an event of the task's
current attempt may move it. To add an event kind: a model in
``broker.messages``, a branch in ``EventHandlers.on_event``, and the moves it
makes through ``Lifecycle.transition`` (never by writing a status).

Every event passes one gate first (``EventGate``, ``orchestrator.event_gate``):
who may say what. What fails it is counted and logged (``refusals``), and does
nothing else. Calls made in-process (not by the bus) have no sender and are trusted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from broker import (
    AgentAnnounced,
    AgentHeartbeat,
    AgentLeft,
    CancelTask,
    CommunicationBus,
    DeadLetter,
    Event,
    ProceedTask,
    TaskAssigned,
    TaskFinished,
    TaskProgress,
    TasksReported,
    TaskStarted,
    tracing,
)
from broker.envelope import current_sender

from .copies import CopyRounds
from .event_gate import EventGate, stale
from .lifecycle import Lifecycle, Move
from .models import Task, TaskStatus
from .outcomes import Outcomes
from .records import TaskRecords
from .registry import AgentRegistry
from .settings import OrchestratorSettings

log = logging.getLogger(__name__)

OUTCOME_STATUS = {
    "completed": TaskStatus.COMPLETED,
    "failed": TaskStatus.FAILED,
    "timeout": TaskStatus.TIMEOUT,
    "cancelled": TaskStatus.CANCELLED,
}


RECANCELS = 3
"""How often one stale attempt is cancelled again on an agent's heartbeats."""
RECANCEL_MEMORY = 10_000


class EventHandlers:
    def __init__(
        self,
        bus: CommunicationBus,
        records: TaskRecords,
        lifecycle: Lifecycle,
        registry: AgentRegistry,
        outcomes: Outcomes,
        settings: OrchestratorSettings,
    ) -> None:
        self.bus = bus
        self.records = records
        self.lifecycle = lifecycle
        self.registry = registry
        self.outcomes = outcomes
        self.settings = settings
        self._confirms: dict[str, tuple[int, str]] = {}
        """Per task, the attempt and agent whose confirm waits for its holder."""
        self._sending: set[asyncio.Task[None]] = set()
        """Answers being sent and copies waiting out the grace: ended by ``stop``."""
        self._starts: dict[str, tuple[int, int]] = {}
        """Per task, its current attempt and how often it started."""
        self._recancelled: OrderedDict[tuple[str, str, int], int] = OrderedDict()
        """Per (agent, task, attempt), the cancels a heartbeat made us send again
        (at most ``RECANCELS``; the newest ``RECANCEL_MEMORY`` remembered)."""
        self.copies = CopyRounds(
            bus,
            lambda: [agent.agent_id for agent in registry],
            self._proceed_copy,
            lambda: settings.unseen_holder_grace,
        )
        self.gate = EventGate(bus, records, registry)
        lifecycle.observe(self)

    async def stop(self) -> None:
        """No longer leading: nothing answers an agent from now on.

        A copy waiting for its round (``copies``) would otherwise be told to
        proceed by an orchestrator that stopped (or one no longer leading,
        beside the one that leads now); its agent asks again, of whoever leads.
        What waits for an answer is forgotten with them, so that a leader
        starting again answers those that ask again afresh.
        """
        await self.copies.stop()
        jobs, self._sending = self._sending, set()
        jobs.discard(asyncio.current_task())  # type: ignore[arg-type]
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        self._confirms.clear()

    async def on_event(self, event: Event) -> None:
        refused = await self.gate.refusal(event, current_sender())
        if refused is not None:
            self.registry.refusals.refuse(*refused)
            return
        if isinstance(event, TaskStarted):
            await self.on_started(event)
        elif isinstance(event, TaskAssigned):
            await self.on_assigned(event)
        elif isinstance(event, TaskFinished) and not tracing.active():
            await self.on_finished(event)  # no span to make, nor its attributes
        elif isinstance(event, TaskFinished):
            sender = current_sender()
            with tracing.event_process_span(
                self.bus.topology,
                sender.trace if sender is not None else None,
                event,
                attributes={"task.id": event.task_id, "task.outcome": event.outcome},
            ):
                await self.on_finished(event)
        elif isinstance(event, TaskProgress):
            task = self.records.get(event.task_id)
            if (
                task is not None
                and task.status is TaskStatus.RUNNING
                and task.attempt == event.attempt
            ):
                task.progress = event.progress
                await self.records.save(task)
        elif isinstance(event, TasksReported):
            self.copies.reported(event.agent_id, event.round)
        elif isinstance(event, AgentHeartbeat):
            await self.registry.heard(event.agent_id)
            if event.holding and self.registry.get(event.agent_id) is not None:
                await self.cancelstale(event.agent_id, event.holding)
        elif isinstance(event, AgentAnnounced):
            await self.registry.register(
                event.agent_id,
                sorted(set(event.capabilities)),
                event.max_concurrent_tasks,
                announced=True,
                specialization=event.specialization_score,
                task_types=event.task_types,
            )
        elif isinstance(event, AgentLeft):
            agent = await self.registry.forget(event.agent_id, "left", returned=True)
            if agent is not None:
                await self.outcomes.agent_gone(
                    agent, returned=True, unfinished=set(event.unfinished)
                )

    async def cancelstale(self, agent_id: str, holding: list[tuple[str, int]]) -> None:
        """Cancel again, on ``agent_id``, each attempt its heartbeat says it runs
        whose task has ended or moved on to a later attempt: the cancel sent when
        it became so may have been lost (commands are not queued for an agent
        whose control queue is being declared again after a reconnect). An
        attempt not yet started here (a heartbeat may overtake its start) is
        not stale."""
        for task_id, attempt in holding:
            task = self.records.get(task_id)
            if task is None or not stale(task, attempt):
                continue  # unknown ids cost a lookup: a heartbeat is not amplified
            key = (agent_id, task_id, attempt)
            sent = self._recancelled.pop(key, 0)
            self._recancelled[key] = sent + 1
            if len(self._recancelled) > RECANCEL_MEMORY:
                self._recancelled.popitem(last=False)
            if sent < RECANCELS:
                log.info(
                    "agent %s still runs task %s attempt %d (%s): cancelled again",
                    agent_id,
                    task_id,
                    attempt,
                    task.status.value if attempt == task.attempt else f"now {task.attempt}",
                )
                await self.bus.publish_control(
                    CancelTask(task_id=task_id, attempt=attempt), agent_id=agent_id
                )

    async def _refusestale(self, event: TaskAssigned | TaskStarted) -> Task | None:
        """The task of an attempt an agent holds, or None after telling the agent
        to drop it: unknown (a submission that failed after all, or forgotten),
        a superseded attempt, or a redelivery of a finished task."""
        task = self.records.get(event.task_id)
        if stale(task, event.attempt):
            await self.bus.publish_control(
                CancelTask(task_id=event.task_id, attempt=event.attempt), agent_id=event.agent_id
            )
            return None
        return task

    async def on_assigned(self, event: TaskAssigned) -> None:
        """An agent holds an attempt it has not started; with ``confirm`` it waits
        for our word (a redelivery whose attempt may have ended)."""
        task = await self._refusestale(event)
        if task is None:
            return
        holder = task.assigned_agent
        if event.confirm and holder not in (None, event.agent_id) and holder in self.registry:
            # A copy of an attempt another live agent holds (its message came back
            # after a broker restart while its handler runs on, or that agent is
            # handing it back as it stops): it must not run beside it. The answer
            # waits: proceed once the holder gives it up, cancel once it ends.
            # Or once the holder is removed: its message came back, so its
            # connection may be dead, which the broker can tell at once.
            self._confirms[task.task_id] = (task.attempt, event.agent_id)
            self.registry.suspect(holder)
            return
        if event.confirm and holder is None and task.status is TaskStatus.PENDING:
            # A copy of an attempt nobody is known to hold: its message came back,
            # so an agent had it, and may have ended it quickly (a quick attempt
            # tells no start) with its final event still on the way. The copy
            # waits until every agent has told what it ran (``copies``): proceed
            # then, cancel if the attempt's end arrives meanwhile (``moved``).
            if self._confirms.get(task.task_id) != (task.attempt, event.agent_id):
                self._confirms[task.task_id] = (task.attempt, event.agent_id)
                self.copies.wait(task.task_id, task.attempt, event.agent_id)
            return
        await self._proceed(task, event)

    async def _proceed(self, task: Task, event: TaskAssigned) -> None:
        if event.confirm:
            await self.bus.publish_control(
                ProceedTask(task_id=task.task_id, attempt=task.attempt), agent_id=event.agent_id
            )
        same_agent = task.assigned_agent == event.agent_id
        if task.status is TaskStatus.ASSIGNED and same_agent:
            return  # the same event again
        if task.status is TaskStatus.RUNNING and same_agent and not event.confirm:
            return  # late: it started since (an agent's events keep their order)
        self.lifecycle.transition(task, TaskStatus.ASSIGNED, agent=event.agent_id)
        await self.records.save(task)

    async def on_started(self, event: TaskStarted) -> None:
        task = self.records.get(event.task_id)
        if (
            task is not None
            and task.status.is_final
            and task.attempt == event.attempt
            and task.assigned_agent == event.agent_id
        ):
            # Late: the agent that ended it told its start after its final event
            # (a start it defers goes out if that event is slow to be confirmed).
            return
        task = await self._refusestale(event)
        if task is None:
            return
        if task.status is TaskStatus.RUNNING and task.assigned_agent == event.agent_id:
            return  # the same event again
        if self._started_too_often(task):
            await self.bus.publish_control(
                CancelTask(task_id=task.task_id, attempt=task.attempt), agent_id=event.agent_id
            )
            await self.outcomes.finish(
                task,
                TaskStatus.FAILED,
                error=f"attempt {task.attempt} started {self.settings.max_deliveries + 1} times"
                " without a final event (its message keeps coming back); given up",
            )
            return
        # Redelivered from a lost agent, or the first start: its run deadline starts.
        self.lifecycle.transition(task, TaskStatus.RUNNING, agent=event.agent_id, at=event.at)
        await self.records.save(task)

    def _started_too_often(self, task: Task) -> bool:
        """Count a start of the task's attempt; whether it is past ``max_deliveries``.
        Counts live only for attempts not ended (see ``moved``)."""
        attempt, count = self._starts.get(task.task_id, (task.attempt, 0))
        count = count + 1 if attempt == task.attempt else 1
        self._starts[task.task_id] = (task.attempt, count)
        return count > self.settings.max_deliveries

    def moved(self, task: Task, move: Move) -> None:
        if move.new.is_final or move.attempt != move.old_attempt:
            self._starts.pop(task.task_id, None)
        waiting = self._confirms.get(task.task_id)
        if waiting is None or move.agent == waiting[1]:
            return
        attempt, agent_id = waiting
        if move.new.is_final or move.attempt != attempt:
            answer: ProceedTask | CancelTask = CancelTask(task_id=task.task_id, attempt=attempt)
        elif move.agent is None:
            answer = ProceedTask(task_id=task.task_id, attempt=attempt)  # handed back
        else:
            return
        del self._confirms[task.task_id]
        self._answer(answer, agent_id)

    async def _proceed_copy(self, task_id: str, attempt: int, agent_id: str) -> None:
        """Once every agent told what it ran (or the grace passed): let a waiting
        copy run, if it still waits and still nobody holds its attempt."""
        if self._confirms.get(task_id) != (attempt, agent_id):
            return  # answered meanwhile
        task = self.records.get(task_id)
        if task is None or task.attempt != attempt or task.assigned_agent is not None:
            return  # moved on: ``moved`` answers it
        del self._confirms[task_id]
        if task.status is TaskStatus.PENDING:
            event = TaskAssigned(task_id=task_id, attempt=attempt, agent_id=agent_id, confirm=True)
            await self._proceed(task, event)

    def _answer(self, command: ProceedTask | CancelTask, agent_id: str) -> None:
        """Send a held answer from an observer (which cannot wait); a lost one is
        asked for again by the agent."""

        async def send() -> None:
            try:
                await self.bus.publish_control(command, agent_id=agent_id)
            except Exception as exc:
                log.warning("answer to agent %s not sent (%s): it asks again", agent_id, exc)

        sending = asyncio.get_running_loop().create_task(send())
        self._sending.add(sending)
        sending.add_done_callback(self._sending.discard)

    async def on_finished(self, event: TaskFinished) -> None:
        task = self.records.get(event.task_id)
        if stale(task, event.attempt):
            if task is not None and event.attempt == task.attempt:
                self.registry.release_slot(task.task_id, event.agent_id)
                if event.outcome == "cancelled":  # an agent skipped the queued message
                    self.registry.skipped(task.task_id)
            return
        status = OUTCOME_STATUS[event.outcome]
        if event.started_at is not None and status is not TaskStatus.CANCELLED:
            self._started_by_final(task, event)
        if status is not TaskStatus.CANCELLED:
            await self.registry.scored(event.agent_id, task, status is TaskStatus.COMPLETED)
        if status in (TaskStatus.FAILED, TaskStatus.TIMEOUT):
            await self.outcomes.attempt_failed(
                task, status, event.error, event.agent_id, event.traceback
            )
            return
        await self.outcomes.finish(
            task, status, result=event.result, error=event.error, at=event.at, agent=event.agent_id
        )

    def _started_by_final(self, task: Task, event: TaskFinished) -> None:
        """An attempt that ended before its agent said it started (a quick one:
        its final event says when it started): it ran, from ``started_at``, and
        every observer hears so before it hears of its end. Not saved here: the
        end is, with it."""
        if task.status is TaskStatus.RUNNING and task.assigned_agent == event.agent_id:
            return  # its start was told
        assert event.started_at is not None
        self.lifecycle.transition(
            task, TaskStatus.RUNNING, agent=event.agent_id, at=min(event.started_at, event.at)
        )

    async def on_dead_letter(self, letter: DeadLetter) -> None:
        """A task message no agent could read: the task fails with the reason (no retry).

        Only a task message of the task's current attempt can end it: those
        carry ``<task_id>:<attempt>`` as their message id (``DeadLetter.attempt``).
        Events and anything else that was dead-lettered (unparseable, or their
        handler failed) have no attempt there; they may name a task in their
        body, but the task is not theirs to end: they are only logged.
        """
        task_id, attempt, kind = letter.task_id, letter.attempt, letter.kind
        if attempt is None or kind not in (None, "task"):
            log.warning(
                "dead letter of %s (task %s) is not a task message of an attempt, nothing done: %s",
                kind or "an unknown message",
                task_id,
                letter.reason,
            )
            return
        task = self.records.get(task_id)
        if task is None or task.status.is_final:
            log.warning("dead letter for no live task (%s): %s", task_id, letter.reason)
            return
        if attempt != task.attempt:
            log.info(
                "dead letter of task %s attempt %d (now %d): %s",
                task_id,
                attempt,
                task.attempt,
                letter.reason,
            )
            return
        refused = self.gate.dead_letter_refusal(letter, task)
        if refused is not None:
            self.registry.refusals.refuse(*refused)
            return
        await self.outcomes.finish(task, TaskStatus.FAILED, error=f"rejected: {letter.reason}")
