"""``TaskOrchestrator``: the seed's API, wired to the bus.

The orchestrator records tasks, releases them to the capability queues when
their dependencies are met, and follows the agents' events. It never picks
an agent itself: the broker hands each task to the best agent with a free
slot (see ``scheduling``). Every event handler is idempotent, keyed by
(task id, attempt), because events can come twice after a reconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from broker import (
    AGENT_ID_PATTERN,
    ANY_CAPABILITY_KEY,
    CAPABILITY_PATTERN,
    AgentAnnounced,
    AgentHeartbeat,
    AgentLeft,
    BusError,
    BusNotStarted,
    CancelTask,
    CommunicationBus,
    ConsumeQueues,
    DeadLetter,
    Event,
    MessageTooLarge,
    Reannounce,
    Subscription,
    TaskFinished,
    TaskMessage,
    TaskProgress,
    TaskStarted,
    TopologyMismatch,
    TopologyMissing,
    Unregister,
    UnroutableMessage,
    capability_key,
    covers,
    retry_tier_ms,
)
from broker.messages import CancelTasks

from . import scheduling
from .dependencies import DependencyGraph
from .models import AgentCapability, Task, TaskPriority, TaskStatus
from .retention import FinishedTasks
from .retries import RetryPolicy
from .settings import OrchestratorSettings
from .stats import StatsTracker
from .store import MemoryStore, StateStore
from .timeouts import RunDeadlines
from .validation import validate_submit

log = logging.getLogger(__name__)

_NOT_ROUTED = (MessageTooLarge, TopologyMismatch, TopologyMissing, UnroutableMessage)
"""What ``publish_task`` raises only when its message is in no queue: refused before
it was sent (too large; a queue or exchange that cannot be declared), or returned
by the broker as unroutable. Anything else it raises (a lost connection, a confirm
that never came, a closed channel) may come after the broker routed the message."""

_RETIRED_STATS = "stats.retired"
"""Store meta key: what forgotten tasks add to ``get_stats``."""
_CANCELLED_IN_QUEUE_KEEP = 10_000
"""At most this many cancelled-in-queue ids are kept, and sent to a newly registered agent."""
_CANCELLED_PER_MESSAGE = 1000
"""Ids per ``CancelTasks`` sent to a new agent (and at most half the bus's message limit)."""

_OUTCOME_STATUS = {
    "completed": TaskStatus.COMPLETED,
    "failed": TaskStatus.FAILED,
    "timeout": TaskStatus.TIMEOUT,
    "cancelled": TaskStatus.CANCELLED,
}


class TaskOrchestrator:
    """Dynamic task assignment and coordination across agents on a ``CommunicationBus``."""

    def __init__(
        self,
        communication_bus: CommunicationBus,
        *,
        settings: OrchestratorSettings | None = None,
        store: StateStore | None = None,
    ) -> None:
        self.bus = communication_bus
        self.settings = settings or OrchestratorSettings()
        self.store = store or MemoryStore()
        self._stats = StatsTracker()
        self._graph = DependencyGraph()
        self._deadlines = RunDeadlines()
        self._finished = FinishedTasks(self.settings.finished_task_ttl)
        # Delayed retries not yet back: a dead-lettered message can be dropped.
        self._retries_due = RunDeadlines()
        self.retry_policy = RetryPolicy(
            self.settings.retry_base_delay, self.settings.retry_max_delay
        )
        self._agents: dict[str, AgentCapability] = {}
        self._queue_caps: dict[str, list[str]] = {ANY_CAPABILITY_KEY: []}
        self._events: Subscription | None = None
        self._dead_letters: Subscription | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._deaf_since: float | None = None
        """When the link to the broker went down (None: it is up)."""
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._cancelled_in_queue: dict[str, None] = {}
        """Cancelled while their message waited in a queue: agents must skip them.
        New agents are told before they consume; an agent's skip report clears one."""
        self._owns_bus = False
        self._started = False
        self._unsent: dict[str, int] = {}
        """Attempts marked queued but known never sent (the bus was failing): the
        watch publishes them without looking for them in their queue."""
        self._publishing: dict[str, int] = {}
        """Attempts being handed to the bus now: the watch leaves them alone."""
        self._declared: dict[str, list[str]] = {}
        """Capability queues declared whose agents are not all told yet (not in
        ``_queue_caps``): an agent that registers meanwhile hears of them too."""

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect the bus, reload stored state and start following events.

        Raises ``ConnectionError`` when the bus cannot reach its broker.
        """
        if self._started:
            return
        if not self.bus.is_connected:
            await self.bus.connect()
            self._owns_bus = True
        await self._settle_reloaded(await self._reload())
        # What the bus acknowledges must be in the store first.
        self._events = await self.bus.subscribe_events(self._on_event, before_ack=self.store.flush)
        self._dead_letters = await self.bus.subscribe_dead_letters(
            self._on_dead_letter, before_ack=self.store.flush
        )
        self._monitor = asyncio.get_running_loop().create_task(self._watch())
        self._started = True
        # Agents that outlived a previous orchestrator announce themselves again.
        await self.bus.publish_control(Reannounce())

    async def stop(self) -> None:
        """Stop following events; close the bus if ``start`` opened it."""
        if not self._started:
            return
        self._started = False
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        for subscription in (self._events, self._dead_letters):
            if subscription is not None:
                await subscription.close()
        if self._owns_bus:
            await self.bus.close()
        await self.store.close()

    async def __aenter__(self) -> TaskOrchestrator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _reload(self) -> list[str]:
        """Rebuild the state from the store; the pending tasks found, to settle once."""
        tasks = await self.store.tasks()
        self._stats.rebuild(tasks, await self.store.get_meta(_RETIRED_STATS))
        self._finished.rebuild(tasks)
        by_id = {t.task_id: t for t in tasks}
        pending: list[str] = []
        now = time.time()
        for task in tasks:
            key = capability_key(task.required_capabilities)
            self._queue_caps.setdefault(key, list(task.required_capabilities))
            if task.status is TaskStatus.RUNNING:
                self._deadlines.start(task.task_id, task.attempt, self._run_deadline(task))
            if task.status is TaskStatus.ASSIGNED and task.retry_due is not None:
                # A delayed retry, or a publish the broker had not confirmed yet.
                # Watched from now at the earliest: an agent may have taken it
                # while no orchestrator ran, its queue empty then, and its events
                # still wait in our events queue. Overdue at once, the first
                # round would publish it again and those events would be ignored
                # as superseded; the grace lets them be handled first.
                self._watch_retry(task, since=max(task.retry_due, now))
            if task.status is TaskStatus.PENDING:
                # A dependency no longer stored was kept until no task needed it: met.
                unmet = [
                    d
                    for d in task.dependencies
                    if d in by_id and by_id[d].status is not TaskStatus.COMPLETED
                ]
                if unmet:
                    self._graph.wait(task.task_id, unmet)
                pending.append(task.task_id)
        for agent in await self.store.agents():
            # A fresh heartbeat window: it could not be heard while we were down.
            if agent.last_seen is not None:
                agent.last_seen = time.time()
            agent.running.clear()
            self._agents[agent.agent_id] = agent
        for task in tasks:
            agent = self._agents.get(task.assigned_agent or "")
            if task.status is TaskStatus.RUNNING and agent is not None:
                agent.running.add(task.task_id)
        for agent in self._agents.values():
            agent.current_load = len(agent.running)
        return pending

    async def _settle_reloaded(self, pending: list[str]) -> None:
        """Finish what a previous orchestrator stopped in the middle of.

        Finishing a task saves it before its dependents are published or
        ended, one by one; a restart in between leaves dependents pending that
        no event will release any more (their dependency is already final).
        So every reloaded pending task whose dependencies all completed is
        published now, and one with a dependency that ended otherwise ends as
        it would have (its own waiting dependents with it). Once, at start.
        """
        ready = []
        for task_id in pending:
            task = await self.store.get_task(task_id)
            if task is None or task.status is not TaskStatus.PENDING:
                continue  # already settled by a dependency ended earlier in this loop
            if not self._graph.is_waiting(task_id):
                log.info("task %s: dependencies met before the restart; publishing it", task_id)
                ready.append(task_id)
                continue
            for dep_id in task.dependencies:
                dep = await self.store.get_task(dep_id)
                if (
                    dep is not None
                    and dep.status.is_final
                    and dep.status is not TaskStatus.COMPLETED
                ):
                    log.info("task %s: dependency %s ended before the restart", task_id, dep_id)
                    await self._end_dependent(task, dep)
                    break
        await self._release(ready, "the restart")
        await self.store.flush()

    def _require_started(self) -> None:
        if not self._started:
            raise ConnectionError("the orchestrator is not started: call await start() first")

    # ------------------------------------------------------------------ agents
    async def register_agent(
        self, agent_id: str, capabilities: list[str], max_concurrent_tasks: int = 5
    ) -> None:
        """Register an agent (or update it); it is told which queues to consume."""
        self._require_started()
        if not isinstance(agent_id, str) or not AGENT_ID_PATTERN.match(agent_id):
            raise ValueError(f"agent_id: {agent_id!r} must be 1-128 of A-Z a-z 0-9 _ . : -")
        if isinstance(capabilities, str) or not all(
            isinstance(c, str) and CAPABILITY_PATTERN.match(c) for c in capabilities
        ):
            raise ValueError(
                f"capabilities: {capabilities!r} must be a list of names of 1-64 of A-Z a-z 0-9 _ -"
            )
        if (
            not isinstance(max_concurrent_tasks, int)
            or isinstance(max_concurrent_tasks, bool)
            or max_concurrent_tasks < 1
        ):
            raise ValueError(
                f"max_concurrent_tasks: must be a whole number >= 1, got {max_concurrent_tasks!r}"
            )
        await self._register(agent_id, sorted(set(capabilities)), max_concurrent_tasks)

    async def _register(
        self,
        agent_id: str,
        capabilities: list[str],
        max_concurrent_tasks: int,
        *,
        announced: bool = False,
        specialization: dict[str, float] | None = None,
    ) -> None:
        """The one path by which agents are registered: by API and by announcement.

        ``announced``: the agent announced itself (it was heard: ``last_seen``).
        No started check here: announcements queued while the orchestrator was
        down arrive as soon as ``start`` subscribes, before it returns.
        """
        agent = self._agents.get(agent_id)
        # It must hear the cancelled-in-queue ids if it is unknown (or new again since
        # it left or was removed), and on every announcement: an agent announces when
        # its process starts, and a restarted process (same id, back before its
        # heartbeats were missed) knows nothing of what its predecessor heard.
        # ``AgentAnnounced`` carries nothing that tells a new process from an old one
        # answering ``Reannounce``, so every announcement gets them; announcements are
        # rare (a process start, an orchestrator start, a heartbeat from an agent the
        # orchestrator does not know), heartbeats of known agents never register again.
        replay = agent is None or announced
        if agent is None:
            agent = AgentCapability(
                agent_id, capabilities, max_concurrent_tasks=max_concurrent_tasks
            )
            self._agents[agent_id] = agent
            log.info("agent %s registered with %s", agent_id, capabilities)
        else:
            agent.capabilities = capabilities
            agent.max_concurrent_tasks = max_concurrent_tasks
        if specialization:
            agent.specialization_score.update(specialization)
        if announced:
            agent.last_seen = time.time()
        await self.store.save_agent(agent)
        await self._send_queues(agent, replay=replay)

    async def _send_queues(self, agent: AgentCapability, *, replay: bool = False) -> None:
        """Tell an agent which queues to consume (those in use, and those declared
        whose agents are being told); with ``replay`` it first hears which queued
        tasks were cancelled (see ``_register``: a running agent heard them as they
        were cancelled)."""
        queue_caps = {**self._queue_caps, **self._declared}
        keys = [k for k, caps in queue_caps.items() if covers(agent.capabilities, caps)]
        if replay and self._cancelled_in_queue:
            # Before the agent consumes anything: what it must not run, oldest first,
            # in chunks well under the bus's size limit.
            budget = self.bus.settings.max_message_bytes // 2
            chunk: list[str] = []
            size = 0
            for task_id in list(self._cancelled_in_queue):  # at most _CANCELLED_IN_QUEUE_KEEP
                entry = len(json.dumps(task_id)) + 1
                if chunk and (len(chunk) >= _CANCELLED_PER_MESSAGE or size + entry > budget):
                    await self.bus.publish_control(
                        CancelTasks(task_ids=chunk), agent_id=agent.agent_id
                    )
                    chunk, size = [], 0
                chunk.append(task_id)
                size += entry
            await self.bus.publish_control(CancelTasks(task_ids=chunk), agent_id=agent.agent_id)
        await self.bus.publish_control(
            ConsumeQueues(queue_keys=keys, consumer_priority=scheduling.consumer_priority(agent)),
            agent_id=agent.agent_id,
        )

    async def unregister_agent(self, agent_id: str) -> None:
        """Remove an agent; its unfinished tasks go back to the queue for other agents."""
        self._require_started()
        if agent_id not in self._agents:
            raise ValueError(f"agent_id: unknown agent {agent_id!r}")
        await self._remove_agent(agent_id, "unregistered")

    async def _remove_agent(
        self,
        agent_id: str,
        why: str,
        *,
        returned: bool = False,
        unfinished: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        """Forget an agent and put its running tasks back in the queue.

        ``returned``: the agent itself gave its deliveries back to the broker
        (a graceful stop), so they only change state, except ``unfinished``
        ones it had acknowledged early (long tasks). Otherwise they are
        re-published as new attempts: a silent agent may still hold them, and
        the attempt it holds is cancelled if it ever starts.
        """
        agent = self._agents.pop(agent_id, None)
        if agent is None:
            return
        log.log(
            logging.INFO if returned else logging.WARNING,
            "agent %s removed (%s) with %d running task(s)",
            agent_id,
            why,
            len(agent.running),
        )
        await self.store.delete_agent(agent_id)
        if not returned:
            # If it still runs, it drops what it holds and stops.
            await self.bus.publish_control(Unregister(agent_id=agent_id), agent_id=agent_id)
        for task_id in sorted(agent.running):
            task = await self.store.get_task(task_id)
            if (
                task is None
                or task.status is not TaskStatus.RUNNING
                or task.assigned_agent != agent_id
            ):
                continue
            if returned and task_id not in unfinished:
                old, task.status, task.assigned_agent = task.status, TaskStatus.ASSIGNED, None
                self._stats.transition(task, old)
                await self.store.save_task(task)
            else:
                await self._publish(task)

    # ------------------------------------------------------------------ tasks
    async def submit_task(
        self,
        name: str,
        description: str,
        task_type: str,
        payload: dict[str, Any],
        priority: TaskPriority | str = TaskPriority.MEDIUM,
        dependencies: list[str] | None = None,
        required_capabilities: list[str] | None = None,
        estimated_duration: int = 300,
        timeout: int = 600,
        max_retries: int = 3,
    ) -> str:
        """Submit a task; returns its id. ``ValueError`` names a bad field."""
        request = validate_submit(
            self.settings.max_payload_bytes,
            name=name,
            description=description,
            task_type=task_type,
            payload=payload,
            priority=priority,
            dependencies=dependencies or [],
            required_capabilities=required_capabilities or [],
            estimated_duration=estimated_duration,
            timeout=timeout,
            max_retries=max_retries,
        )
        self._require_started()
        deps = []
        for dep_id in request.dependencies:
            dep = await self.store.get_task(dep_id)
            if dep is None:
                raise ValueError(f"dependencies: unknown task id {dep_id!r}")
            deps.append(dep)

        task = Task(
            task_id=f"task_{uuid.uuid4().hex}",
            name=request.name,
            description=request.description,
            task_type=request.task_type,
            priority=request.priority,
            payload=request.payload,
            dependencies=request.dependencies,
            required_capabilities=request.required_capabilities,
            estimated_duration=request.estimated_duration,
            max_retries=request.max_retries,
            timeout=request.timeout,
        )
        await self.store.save_task(task)
        self._stats.created_task(task)
        self._finished.submitted(task)

        doomed_by = next(
            (d for d in deps if d.status.is_final and d.status is not TaskStatus.COMPLETED), None
        )
        if doomed_by is not None:
            await self._end_dependent(task, doomed_by)
            await self.store.flush()
            return task.task_id
        unmet = [d.task_id for d in deps if d.status is not TaskStatus.COMPLETED]
        if unmet:
            self._graph.wait(task.task_id, unmet)
            await self.store.flush()
            return task.task_id
        try:
            await self._publish(task)
        except asyncio.CancelledError:
            # The caller gave up, not the bus: the task is marked queued and watched
            # (published again if it never reached its queue). Nothing is deleted.
            raise
        except Exception as exc:
            if self._unsent.get(task.task_id) == task.attempt and self._never_started(task):
                # Certainly in no queue (it failed before the bus was handed it, or the
                # bus says so): not accepted after all, leave no trace.
                await self._withdraw(task)
                raise
            # The message may have been routed although the publish failed (a confirm
            # lost or late, the connection lost after sending): an agent may have run
            # it already, its events still waiting to be handled. It is accepted:
            # withdrawing it would leave it running unknown, and a resubmission would
            # run it twice. It stays watched: published again if it never reached its
            # queue (the attempt fence makes a duplicate harmless).
            log.warning(
                "task %s: its publish failed (%s) but may have reached its queue"
                " (%s at attempt %d): accepted, and watched",
                task.task_id,
                exc,
                task.status.value,
                task.attempt,
            )
            return task.task_id
        return task.task_id

    @staticmethod
    def _never_started(task: Task) -> bool:
        """Still its first attempt, queued, and no agent ever reported it started
        (a task handed back by an agent that stopped is queued again, started)."""
        return task.status is TaskStatus.ASSIGNED and task.attempt == 1 and task.started_at is None

    async def _withdraw(self, task: Task) -> None:
        """Forget a task whose submission failed, as if it had never been submitted."""
        if not self._never_started(task):
            return  # it was taken further meanwhile (started, cancelled, published again)
        self._retries_due.discard(task.task_id)
        self._unsent.pop(task.task_id, None)
        self._stats.forget_task(task)
        self._finished.withdrawn(task)
        await self.store.delete_task(task.task_id)
        try:
            await self.store.flush()
        except Exception:
            log.exception("task %s: its withdrawal is not saved yet", task.task_id)

    async def _publish(
        self,
        task: Task,
        *,
        delay: float = 0.0,
        avoid: list[str] | None = None,
        send: bool = True,
    ) -> None:
        """Hand the task to the bus as a new attempt, after ``delay`` seconds.

        The attempt is marked queued, saved and watched first, before anything
        can fail: until the broker confirms it (a delayed retry: until an agent
        starts it) it is in flight (``retry_due``), so if the publish fails, or
        the orchestrator stops before the broker confirmed it, the lost-retry
        watch publishes it again once its queue is empty (or at once if it was
        known never sent). ``send`` False only marks it so, without a word to
        the bus (it is failing: the watch publishes it when it can, declaring its
        queue then).
        """
        key = capability_key(task.required_capabilities)
        old = task.status
        task.attempt += 1
        attempt = task.attempt
        task.status = TaskStatus.ASSIGNED
        task.assigned_agent = None
        task.progress = 0.0
        self._deadlines.discard(task.task_id)
        # The tier, not the delay, bounds when a delayed one is back (TTL expires at
        # the head); any other is due now. Cleared once confirmed (an undelayed one)
        # or when an agent starts it.
        task.retry_due = time.time() + (retry_tier_ms(delay) / 1000 if delay > 0 else 0)
        self._watch_retry(task)
        self._unsent[task.task_id] = attempt  # until handed to publish_task
        self._stats.transition(task, old)
        await self.store.save_task(task)
        if not send:
            return
        self._publishing[task.task_id] = attempt
        try:
            # Written before published: events of this attempt must find it on restart.
            await self.store.flush()
            await self._ensure_queue(key, task.required_capabilities)
            message = TaskMessage(
                task_id=task.task_id,
                attempt=attempt,
                name=task.name,
                task_type=task.task_type,
                payload=task.payload,
                priority=task.priority.value,
                required_capabilities=task.required_capabilities,
                timeout=task.timeout,
                estimated_duration=task.estimated_duration,
                dependency_results=await self._dependency_results(task),
                avoid_agents=avoid or [],
            )
            if task.attempt != attempt or task.status is not TaskStatus.ASSIGNED:
                return  # superseded (cancelled, or published again) while we waited
            if not self.bus.is_connected:
                raise BusNotStarted("the bus is not connected")
            # From here it may reach its queue even if this fails: the watch looks first.
            if self._unsent.get(task.task_id) == attempt:
                del self._unsent[task.task_id]
            try:
                await self.bus.publish_task(
                    message,
                    queue_key=key,
                    priority=scheduling.message_priority(task.priority, task.estimated_duration),
                    delay=delay,
                )
            except _NOT_ROUTED:
                if task.attempt == attempt and task.status is TaskStatus.ASSIGNED:
                    self._unsent[task.task_id] = attempt  # known never sent
                raise
        except BaseException:
            if task.attempt == attempt and task.status is TaskStatus.ASSIGNED:
                self._watch_retry(task)  # again: a round of the watch may have taken it
            raise
        finally:
            if self._publishing.get(task.task_id) == attempt:
                del self._publishing[task.task_id]
        if delay <= 0 and task.attempt == attempt and task.status is TaskStatus.ASSIGNED:
            # Confirmed: in its durable queue, it can no longer be lost (only a delayed
            # retry can be dropped on its way back), so nobody watches it any more,
            # not even an orchestrator that restarts before it starts. That one could
            # not tell it from an attempt an agent took while no orchestrator ran (the
            # queue is empty, its events wait in the events queue): publishing it again
            # would cancel the running attempt, or discard its result as superseded.
            # Durable with the next flush (before an event is acknowledged, or soon).
            self._retries_due.discard(task.task_id)
            task.retry_due = None
            try:
                await self.store.save_task(task)
            except Exception:
                # The publish succeeded: a failure of this bookkeeping (a store closed by
                # a stop racing this publish) is no failed publish. Unsaved, a restart
                # watches it again, as it does any publish it never saw confirmed.
                log.exception("task %s: saving its confirmed publish failed", task.task_id)

    async def _ensure_queue(self, key: str, capabilities: list[str]) -> None:
        """Declare a capability queue new to this orchestrator and tell every agent
        that can consume it to do so. It counts as in use (``_queue_caps``) only
        once they were all told: if anything fails, the next publish does it all
        again (both steps are idempotent). Meanwhile it is in ``_declared``: an
        agent that registers or announces itself (again: a restarted process)
        while the others are told hears of it from ``_register``, even if it was
        told already."""
        if key in self._queue_caps:
            return
        await self.bus.declare_task_queue(key)
        # Kept if telling fails: the queue exists, a new agent may as well consume it.
        self._declared[key] = list(capabilities)
        told: set[str] = set()
        while True:
            # Agents registered while we told the others are told too.
            untold = [
                a
                for a in self._agents.values()
                if a.agent_id not in told and covers(a.capabilities, capabilities)
            ]
            if not untold:
                break
            for agent in untold:
                await self._send_queues(agent)
                told.add(agent.agent_id)
        self._declared.pop(key, None)
        self._queue_caps[key] = list(capabilities)

    async def _dependency_results(self, task: Task) -> dict[str, Any]:
        results = {}
        for dep_id in task.dependencies:
            dep = await self.store.get_task(dep_id)
            if dep is not None:
                results[dep_id] = dep.result
        return results

    async def cancel_task(self, task_id: str) -> bool:
        """Cancel a task that has not finished; False if unknown or already finished."""
        self._require_started()
        task = await self.store.get_task(task_id)
        if task is None or task.status.is_final:
            return False
        was = task.status
        await self._finish(task, TaskStatus.CANCELLED, error="cancelled by request")
        if was is TaskStatus.RUNNING and task.assigned_agent:
            await self.bus.publish_control(
                CancelTask(task_id=task_id), agent_id=task.assigned_agent
            )
        elif was is TaskStatus.ASSIGNED:
            # Whichever agent receives it skips it, including agents yet to come.
            self._cancelled_in_queue[task_id] = None
            if len(self._cancelled_in_queue) > _CANCELLED_IN_QUEUE_KEEP:
                # Only the newest are ever sent; agents skip an older one by its attempt
                # fence (its TaskStarted is answered with a CancelTask).
                del self._cancelled_in_queue[next(iter(self._cancelled_in_queue))]
            await self.bus.publish_control(CancelTask(task_id=task_id))
        await self.store.flush()
        return True

    async def get_task_status(self, task_id: str) -> dict[str, Any] | None:
        task = await self.store.get_task(task_id)
        if task is None:
            return None
        return {
            "task_id": task.task_id,
            "name": task.name,
            "status": task.status.value,
            "assigned_agent": task.assigned_agent,
            "created_at": task.created_at,
            "started_at": task.started_at,
            "priority": task.priority.value,
            "progress": task.progress,
            "result": task.result,
            "error_message": task.error_message,
            # beyond the seed's keys
            "retry_count": task.retry_count,
        }

    async def wait_for_task(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the task is final; its status. (Beyond the seed: no polling loop.)

        Raises ``ValueError`` for an unknown id and ``TimeoutError`` after ``timeout``.
        """
        task = await self.store.get_task(task_id)
        if task is None:
            raise ValueError(f"task_id: unknown task {task_id!r}")
        if not task.status.is_final:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(task_id, []).append(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
            finally:
                waiters = self._waiters.get(task_id, [])
                if waiter in waiters:
                    waiters.remove(waiter)
                if not waiters:
                    self._waiters.pop(task_id, None)
        status = await self.get_task_status(task_id)
        assert status is not None
        return status

    async def get_stats(self) -> dict[str, Any]:
        return self._stats.snapshot(self._agents.values())

    async def get_agents(self) -> list[AgentCapability]:
        """The registered agents (beyond the seed: for tools and tests)."""
        return list(self._agents.values())

    async def get_queues(self) -> dict[str, list[str]]:
        """The capability queues in use, by key, with the capabilities each needs
        (beyond the seed: for tools)."""
        return {key: list(caps) for key, caps in self._queue_caps.items()}

    # ------------------------------------------------------------------ finishing
    async def _finish(
        self,
        task: Task,
        status: TaskStatus,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        at: float | None = None,
        cascade: bool = True,
    ) -> None:
        """Put a task in a final state, free its agent slot, settle its dependents.

        ``cascade`` False: the caller is already walking the dependents.
        """
        old = task.status
        task.status = status
        task.completed_at = at if at is not None else time.time()
        task.result = result
        task.error_message = error
        if status is TaskStatus.COMPLETED:
            task.progress = 1.0
        self._graph.forget(task.task_id)
        self._deadlines.discard(task.task_id)
        self._retries_due.discard(task.task_id)
        self._unsent.pop(task.task_id, None)
        self._release_slot(task.task_id, task.assigned_agent)
        self._stats.transition(task, old)
        self._finished.finished(task)
        await self.store.save_task(task)

        for waiter in self._waiters.pop(task.task_id, ()):
            if not waiter.done():
                waiter.set_result(None)
        if not cascade:
            return
        if status is TaskStatus.COMPLETED:
            await self._release(self._graph.completed(task.task_id), f"task {task.task_id}")
        else:
            for doomed_id, cause_id in self._graph.doomed(task.task_id):
                doomed = await self.store.get_task(doomed_id)
                cause = await self.store.get_task(cause_id)
                if doomed is not None and cause is not None and not doomed.status.is_final:
                    await self._end_dependent(doomed, cause, cascade=False)

    async def _release(self, ready_ids: list[str], why: str) -> None:
        """Publish the dependents whose dependencies are all met now.

        They are gone from the dependency graph, and the dependency is final
        (an event for it again changes nothing): none may be left pending. So
        once the bus fails to take one, the rest are only marked queued, and
        the lost-retry watch publishes them when it can.
        """
        bus_failing = False
        for ready_id in ready_ids:
            ready = await self.store.get_task(ready_id)
            if ready is None or ready.status is not TaskStatus.PENDING:
                continue
            if bus_failing:
                await self._publish(ready, send=False)
                continue
            try:
                await self._publish(ready)
            except MessageTooLarge as exc:
                # Its dependencies' results make it too large: it can never run.
                await self._finish(ready, TaskStatus.FAILED, error=f"not published: {exc}")
            except BusError as exc:
                log.warning(
                    "publishing tasks released by %s failed (%s); they are watched and"
                    " published when the bus can",
                    why,
                    exc,
                )
                bus_failing = True
            except Exception:
                # Marked queued and watched before anything could fail: the watch
                # publishes it again; the others are released as usual.
                log.exception("publishing task %s released by %s failed", ready_id, why)

    async def _end_dependent(self, task: Task, cause: Task, *, cascade: bool = True) -> None:
        """End a task because its dependency ``cause`` will never complete."""
        status = TaskStatus.CANCELLED if cause.status is TaskStatus.CANCELLED else TaskStatus.FAILED
        error = f"dependency {cause.task_id} ({cause.name}) ended {cause.status.value}"
        await self._finish(task, status, error=error, cascade=cascade)

    def _release_slot(self, task_id: str, agent_id: str | None) -> None:
        agent = self._agents.get(agent_id) if agent_id else None
        if agent is not None and task_id in agent.running:
            agent.running.discard(task_id)
            agent.current_load = len(agent.running)

    # ------------------------------------------------------------------ events
    async def _on_event(self, event: Event) -> None:
        if isinstance(event, TaskStarted):
            await self._on_started(event)
        elif isinstance(event, TaskFinished):
            await self._on_finished(event)
        elif isinstance(event, TaskProgress):
            task = await self.store.get_task(event.task_id)
            if (
                task is not None
                and task.status is TaskStatus.RUNNING
                and task.attempt == event.attempt
            ):
                task.progress = event.progress
                await self.store.save_task(task)
        elif isinstance(event, AgentHeartbeat):
            agent = self._agents.get(event.agent_id)
            if agent is None:
                await self.bus.publish_control(Reannounce(), agent_id=event.agent_id)
            else:
                agent.last_seen = time.time()
        elif isinstance(event, AgentAnnounced):
            await self._register(
                event.agent_id,
                sorted(set(event.capabilities)),
                event.max_concurrent_tasks,
                announced=True,
                specialization=event.specialization_score,
            )
        elif isinstance(event, AgentLeft):
            await self._remove_agent(
                event.agent_id, "left", returned=True, unfinished=set(event.unfinished)
            )

    async def _on_started(self, event: TaskStarted) -> None:
        task = await self.store.get_task(event.task_id)
        if task is None or task.status.is_final or event.attempt != task.attempt:
            # Unknown (a submission that failed after all, or forgotten), a superseded
            # attempt, or a redelivery of a finished task: stop it.
            await self.bus.publish_control(
                CancelTask(task_id=event.task_id, attempt=event.attempt), agent_id=event.agent_id
            )
            return
        if task.status is TaskStatus.RUNNING and task.assigned_agent == event.agent_id:
            return  # the same event again
        old = task.status
        self._release_slot(task.task_id, task.assigned_agent)  # redelivered from a lost agent
        task.status = TaskStatus.RUNNING
        task.assigned_agent = event.agent_id
        task.started_at = event.at
        # No longer in flight (a delayed retry was until now): saved below with the rest.
        task.retry_due = None
        self._retries_due.discard(task.task_id)
        self._unsent.pop(task.task_id, None)
        self._deadlines.start(task.task_id, task.attempt, self._run_deadline(task))
        self._stats.transition(task, old)
        agent = self._agents.get(event.agent_id)
        if agent is not None:
            agent.running.add(task.task_id)
            agent.current_load = len(agent.running)
            agent.last_seen = time.time()
        await self.store.save_task(task)

    async def _on_finished(self, event: TaskFinished) -> None:
        task = await self.store.get_task(event.task_id)
        if task is None or task.status.is_final or event.attempt != task.attempt:
            if task is not None and event.attempt == task.attempt:
                self._release_slot(task.task_id, event.agent_id)
                if event.outcome == "cancelled":  # an agent skipped the queued message
                    self._cancelled_in_queue.pop(task.task_id, None)
            return
        if task.assigned_agent != event.agent_id:
            self._release_slot(task.task_id, task.assigned_agent)
            task.assigned_agent = event.agent_id
        agent = self._agents.get(event.agent_id)
        status = _OUTCOME_STATUS[event.outcome]
        if agent is not None and status is not TaskStatus.CANCELLED:
            before = scheduling.consumer_priority(agent)
            scheduling.record_outcome(agent, task.task_type, status is TaskStatus.COMPLETED)
            if scheduling.consumer_priority(agent) != before:
                await self._send_queues(agent)
        if status in (TaskStatus.FAILED, TaskStatus.TIMEOUT):
            await self._attempt_failed(task, status, event.error, event.agent_id)
            return
        await self._finish(task, status, result=event.result, error=event.error, at=event.at)

    async def _attempt_failed(
        self, task: Task, status: TaskStatus, error: str | None, agent_id: str | None
    ) -> None:
        """Retry after a back-off, preferring another agent, or end the task."""
        if task.retry_count >= task.max_retries:
            await self._finish(task, status, error=error)
            return
        task.retry_count += 1
        task.error_message = error
        self._release_slot(task.task_id, agent_id)
        delay = self.retry_policy.delay(task.retry_count)
        avoid = [agent_id] if agent_id and self._another_can_run(task, agent_id) else []
        log.info(
            "task %s attempt %d %s (%s); retry %d/%d in %.2fs",
            task.task_id,
            task.attempt,
            status.value,
            error,
            task.retry_count,
            task.max_retries,
            delay,
        )
        await self._publish(task, delay=delay, avoid=avoid)

    def _another_can_run(self, task: Task, agent_id: str) -> bool:
        return any(
            a.agent_id != agent_id and covers(a.capabilities, task.required_capabilities)
            for a in self._agents.values()
        )

    def _run_deadline(self, task: Task) -> float:
        return time.time() + task.timeout + self.settings.timeout_grace

    async def _on_dead_letter(self, letter: DeadLetter) -> None:
        """A task message no agent could read: the task fails with the reason (no retry).

        Only a task message of the task's current attempt can end it: those
        carry ``<task_id>:<attempt>`` as their message id (``DeadLetter.attempt``).
        Events and anything else that was dead-lettered (unparseable, or their
        handler failed) have no attempt there; they may name a task in their
        body, but the task is not theirs to end: they are only logged.
        """
        task_id, attempt = letter.task_id, letter.attempt
        kind = letter.kind
        if attempt is None or kind not in (None, "task"):
            log.warning(
                "dead letter of %s (task %s) is not a task message of an attempt, nothing done: %s",
                kind or "an unknown message",
                task_id,
                letter.reason,
            )
            return
        task = await self.store.get_task(task_id) if task_id else None
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
        await self._finish(task, TaskStatus.FAILED, error=f"rejected: {letter.reason}")

    # ------------------------------------------------------------------ liveness
    async def _watch(self) -> None:
        """Unregister agents whose heartbeats stopped (their tasks are re-queued),
        and time out running tasks whose agent went silent past their deadline."""
        while True:
            await asyncio.sleep(self.settings.monitor_interval)
            if not self._hearing():
                continue
            try:
                await self._check_agents()
                await self._check_deadlines()
                await self._check_retries()
                await self._forget_finished()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep watching
                log.exception("watch round failed")

    def _hearing(self) -> bool:
        """Whether silence means anything now. While the broker link is down
        nobody can be heard; once it is back, every agent and running task gets
        the time it was down added to its allowance."""
        now = time.time()
        if not self.bus.link_up:
            if self._deaf_since is None:
                self._deaf_since = now
                log.warning("broker link down: agent and task deadlines paused")
            return False
        if self._deaf_since is not None:
            lost, self._deaf_since = now - self._deaf_since, None
            log.info("broker link back after %.1fs: deadlines extended by as much", lost)
            for agent in self._agents.values():
                if agent.last_seen is not None:
                    agent.last_seen = max(agent.last_seen + lost, now)
            self._deadlines.postpone(lost)
            self._retries_due.postpone(lost)
        return True

    async def _check_agents(self) -> None:
        deadline = time.time() - self.settings.heartbeat_timeout
        for agent in list(self._agents.values()):
            if agent.last_seen is not None and agent.last_seen < deadline:
                await self._remove_agent(agent.agent_id, "missed heartbeats")

    async def _forget_finished(self) -> None:
        """Drop the finished tasks past ``finished_task_ttl``; they go on counting."""
        forgotten = 0
        for task_id in self._finished.expired(time.time()):
            task = await self.store.get_task(task_id)
            if task is None or not task.status.is_final:
                continue
            self._stats.retire(task)
            await self.store.delete_task(task_id)
            forgotten += 1
        if forgotten:
            await self.store.save_meta(_RETIRED_STATS, self._stats.retired)
            await self.store.flush()
            log.debug("forgot %d finished task(s)", forgotten)

    def _watch_retry(self, task: Task, *, since: float | None = None) -> None:
        """Watch a queued attempt until it should have reached its queue: a
        delayed retry until its tier is over, any other one from when it was
        published (``retry_due``), or from ``since`` if given. Plus
        ``lost_retry_grace``."""
        if since is None:
            since = task.retry_due or time.time()
        due = since + self.settings.lost_retry_grace
        self._retries_due.start(task.task_id, task.attempt, due)

    async def _check_retries(self) -> None:
        """Publish again a queued attempt that never reached its queue: a delayed
        retry (DESIGN.md: classic queues dead-letter at most once), or one saved
        by an orchestrator that stopped before it published it. Overdue with its
        queue empty means lost; if it was not, the attempt fence makes the copy
        harmless. One depth look-up per queue per round.

        The round's attempts left the watch when they expired: whatever happens,
        each one not looked at yet is watched again (a bus failure pauses the
        round; any other failure costs only the attempt it happened to)."""
        now = time.time()
        later = now + self.settings.lost_retry_grace
        depths: dict[str, int] = {}
        due = self._retries_due.expired(now)
        done = 0
        try:
            for task_id, attempt in due:
                try:
                    await self._check_retry(task_id, attempt, depths, later)
                except BusError as exc:
                    # Not now: this one and the rest of the round are looked at later.
                    log.warning("watch of queued tasks paused: %s", exc)
                    return
                except Exception:
                    log.exception("watch of task %s (attempt %d) failed", task_id, attempt)
                    if task_id not in self._retries_due:
                        # Looked at again later (if it went further meanwhile, that
                        # round finds it is no longer the attempt in flight).
                        self._retries_due.start(task_id, attempt, later)
                done += 1
        finally:
            for other_id, other_attempt in due[done:]:
                if other_id not in self._retries_due:
                    self._retries_due.start(other_id, other_attempt, later)

    @staticmethod
    def _in_flight(task: Task | None, attempt: int) -> bool:
        return task is not None and task.status is TaskStatus.ASSIGNED and task.attempt == attempt

    async def _check_retry(
        self, task_id: str, attempt: int, depths: dict[str, int], later: float
    ) -> None:
        """One attempt of a ``_check_retries`` round. Its state is looked at again
        after every wait: an event handled meanwhile may have started it."""
        task = await self.store.get_task(task_id)
        if not self._in_flight(task, attempt):
            if self._unsent.get(task_id) == attempt:
                del self._unsent[task_id]  # cancelled meanwhile
            return
        assert task is not None
        if task_id in self._publishing:
            # Its publish is still under way (a slow bus): look again later.
            self._retries_due.start(task_id, attempt, later)
            return
        key = capability_key(task.required_capabilities)
        if self._unsent.get(task_id) != attempt:
            if key not in depths:
                depths[key] = await self.bus.queue_depth(key)
                if not self._in_flight(task, attempt):
                    return  # started (or cancelled, or published again) while we looked
            if depths[key] > 0:
                # It may wait behind others: look again later.
                self._retries_due.start(task_id, attempt, later)
                return
        log.warning(
            "task %s (attempt %d) never reached its queue: publishing it again", task_id, attempt
        )
        try:
            await self._publish(task)
        except MessageTooLarge as exc:
            await self._finish(task, TaskStatus.FAILED, error=f"not published: {exc}")

    async def _check_deadlines(self) -> None:
        for task_id, attempt in self._deadlines.expired(time.time()):
            task = await self.store.get_task(task_id)
            if task is None or task.status is not TaskStatus.RUNNING or task.attempt != attempt:
                continue
            agent_id = task.assigned_agent
            if agent_id:
                await self.bus.publish_control(
                    CancelTask(task_id=task_id, attempt=attempt), agent_id=agent_id
                )
            await self._attempt_failed(
                task,
                TaskStatus.TIMEOUT,
                f"no result from agent {agent_id} within the timeout of {task.timeout:g}s"
                f" (+{self.settings.timeout_grace:g}s grace)",
                agent_id,
            )
