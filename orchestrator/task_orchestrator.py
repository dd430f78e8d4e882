"""``TaskOrchestrator``: the seed's API, and the wiring of the parts that carry it out.

The orchestrator records tasks, releases them to the capability queues when
their dependencies are met, and follows the agents' events. It never picks
an agent itself: the broker hands each task to the best agent with a free
slot (see ``placement``). Where each part lives:

- ``lifecycle``: the legal status moves, and the one ``transition`` that makes them;
- ``records``: the identity map of task records (the store is a journal behind it);
- ``dispatch``: the outbox (publishing, queue declaration, lost-message watch);
- ``registry``: agents (register, remove, liveness, what each consumes);
- ``events``: handlers of what agents report, and of dead letters;
- ``outcomes``: retries, final statuses, dependents, waiters;
- ``watch``: what silence means (dead agents, silent tasks, lost messages, retention);
- ``leader_term``: what leading does (reload, follow events, watch) and stepping down.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from broker import CancelTask, CommunicationBus, tracing

from . import listing
from .agent_queues import AgentQueues
from .dispatch import Dispatch, queue_key
from .events import EventHandlers
from .idempotency import IdempotentSubmits, check_key
from .leader_term import LeaderTerm
from .leadership import Leadership
from .lifecycle import Lifecycle
from .models import FINAL_STATUSES, AgentCapability, Task, TaskStatus
from .outcomes import Outcomes
from .placement import PlacementPolicy, QueueSpec
from .records import TaskRecords
from .registry import AgentRegistry
from .retention import FinishedTasks
from .retries import RetryPolicy
from .settings import OrchestratorSettings
from .stats import StatsTracker
from .store import MemoryStore, StateStore
from .submission import Submission
from .submit_arguments import SubmitArguments, takes_submit_arguments
from .validation import SubmitRequest, validate_agent, validate_submit
from .watch import Watch

log = logging.getLogger(__name__)


class TaskOrchestrator:
    """Dynamic task assignment and coordination across agents on a ``CommunicationBus``."""

    def __init__(
        self,
        communication_bus: CommunicationBus,
        *,
        settings: OrchestratorSettings | None = None,
        store: StateStore | None = None,
        placement: PlacementPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = communication_bus
        self.settings = settings or OrchestratorSettings()
        self.store = store or MemoryStore()
        self.placement = placement or PlacementPolicy()
        self.retry_policy = RetryPolicy(
            self.settings.retry_base_delay, self.settings.retry_max_delay
        )
        # Observers hear each move in this order: the counters first, then the
        # parts that may act on it.
        self.lifecycle = Lifecycle(clock)
        self._stats = StatsTracker()
        self._finished = FinishedTasks(self.settings.finished_task_ttl)
        self.lifecycle.observe(self._stats)
        self.lifecycle.observe(self._finished, to=FINAL_STATUSES)  # retention starts at the end
        self.records = TaskRecords(self.store)
        self.dispatch = Dispatch(
            self.bus,
            self.records,
            self.lifecycle,
            self.settings,
            self.placement,
            tell_agents=lambda spec: self.registry.tell_new_queue(spec),
        )
        self.submission = Submission(self.dispatch)
        self.idempotent = IdempotentSubmits(self.records)
        self.agent_queues = AgentQueues(
            self.bus, lambda event: self.events.on_event(event), self.store.flush
        )
        self.registry = AgentRegistry(
            self.bus,
            self.store,
            self.lifecycle,
            self.placement,
            self.dispatch.queues,
            self.agent_queues,
            heartbeat_timeout=self.settings.heartbeat_timeout,
        )
        self.outcomes = Outcomes(
            self.records,
            self.lifecycle,
            self.dispatch,
            self.registry,
            self.placement,
            self.retry_policy,
        )
        self.events = EventHandlers(
            self.bus, self.records, self.lifecycle, self.registry, self.outcomes, self.settings
        )
        self.watch = Watch(
            self.bus,
            self.settings,
            self.records,
            self.lifecycle,
            self.registry,
            self.dispatch,
            self.outcomes,
            self._stats,
            self._finished,
        )
        self._owns_bus = False
        self._started = False
        self.leadership = Leadership(self.bus, self.store, reclaim=self.settings.reclaim_lease)
        """One leader per prefix: a second orchestrator stands by (``leadership``)."""
        self.term = LeaderTerm(self, self._stats, self._finished)
        """What leading does: reload, follow events, watch; and stepping down."""

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect the bus; lead the prefix, or stand by while another orchestrator leads.

        Leading: reload stored state and start following events. Standing by
        (``leadership.role``), the API raises ``NotLeader`` until the leader goes;
        then this one takes over. Raises ``ConnectionError`` when the bus
        cannot reach its broker.
        """
        if self._started:
            return
        if not self.bus.is_connected:
            await self.bus.connect()
            self._owns_bus = True
        try:
            await self.leadership.start(self.term.begin, self.term.end)
        except BaseException:
            if self._owns_bus:
                await self.bus.close()
            raise
        self._started = True

    async def stop(self) -> None:
        """Stop following events (or standing by); close the bus if ``start`` opened it."""
        if not self._started:
            return
        self._started = False
        await self.term.end()
        await self.leadership.stop()
        if self._owns_bus:
            await self.bus.close()
        await self.store.close()

    async def __aenter__(self) -> TaskOrchestrator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _require_started(self) -> None:
        if not self._started:
            raise ConnectionError("the orchestrator is not started: call await start() first")
        self.leadership.require_leader()

    # ------------------------------------------------------------------ agents
    async def register_agent(
        self, agent_id: str, capabilities: list[str], max_concurrent_tasks: int = 5
    ) -> None:
        """Register an agent (or update it); it is told which queues to consume."""
        self._require_started()
        validate_agent(agent_id, capabilities, max_concurrent_tasks)
        await self.registry.register(agent_id, sorted(set(capabilities)), max_concurrent_tasks)

    async def unregister_agent(self, agent_id: str) -> None:
        """Remove an agent; its unfinished tasks go back to the queue for other agents."""
        self._require_started()
        if agent_id not in self.registry:
            raise ValueError(f"agent_id: unknown agent {agent_id!r}")
        await self.watch.remove_agent(agent_id, "unregistered")
        await self.registry.unbind(agent_id)  # its id may be another user's now

    # ------------------------------------------------------------------ tasks
    @takes_submit_arguments
    async def submit_task(self, arguments: SubmitArguments) -> str:
        """Submit a task; returns its id. ``ValueError`` names a bad field.

        The parameters are ``SubmitArguments``'s fields, the seed's
        ``(name, description, task_type, payload, priority=..., dependencies=...,
        required_capabilities=..., estimated_duration=300, timeout=600)`` then
        ``max_retries=3`` and ``idempotency_key=None``. Beyond the seed: while the
        task submitted with ``idempotency_key`` is kept, a submit with that key
        returns its id and creates nothing (with other parameters it is refused:
        see ``idempotency``).
        """
        fields = arguments.fields()
        idempotency_key = fields.pop("idempotency_key")
        request = validate_submit(self.settings.max_payload_bytes, **fields)
        key = check_key(idempotency_key)
        self._require_started()
        if key is not None:
            return await self.idempotent.once(key, request, lambda: self._submit(request, key))
        return await self._submit(request, None)

    async def _submit(self, request: SubmitRequest, key: str | None) -> str:
        """Record, and publish or hold, a new task for a checked request."""
        deps = []
        for dep_id in request.dependencies:
            dep = self.records.get(dep_id)
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
            created_at=self.lifecycle.clock(),
            idempotency_key=key,
            trace_context=tracing.current_context(),
        )
        # One without dependencies is published at once, and the publish journals
        # it before anything can fail or wait (``Dispatch.publish``): not twice.
        await self.records.add(task, journal=bool(deps))
        self._stats.created_task(task)
        self._finished.submitted(task)

        doomed_by = next(
            (d for d in deps if d.status.is_final and d.status is not TaskStatus.COMPLETED), None
        )
        if doomed_by is not None:
            await self.outcomes.end_dependent(task, doomed_by)
            await self.store.flush()
            return task.task_id
        unmet = [d.task_id for d in deps if d.status is not TaskStatus.COMPLETED]
        if unmet:
            self.outcomes.graph.wait(task.task_id, unmet)
            await self.store.flush()
            return task.task_id
        self.registry.warn_if_unrunnable(queue_key(task), QueueSpec.of(task))
        await self.submission.publish(task, self.settings.submit_timeout, self._forget)
        return task.task_id

    def _forget(self, task: Task) -> None:
        """Undo what a submit counted, for a task withdrawn after all."""
        self._stats.forget_task(task)
        self._finished.withdrawn(task)

    async def cancel_task(self, task_id: str) -> bool:
        """Cancel a task that has not finished; False if unknown or already finished."""
        self._require_started()
        task = self.records.get(task_id)
        if task is None or task.status.is_final:
            return False
        queued, agent_id = (
            task.status is TaskStatus.PENDING and task.attempt > 0,
            task.assigned_agent,
        )
        await self.outcomes.finish(task, TaskStatus.CANCELLED, error="cancelled by request")
        if agent_id:  # it holds it: it skips it, or stops its handler
            await self.bus.publish_control(CancelTask(task_id=task_id), agent_id=agent_id)
        elif queued:
            # Whichever agent receives it skips it, including agents yet to come.
            self.registry.cancelled_in_queue(task_id)
            await self.bus.publish_control(CancelTask(task_id=task_id))
        await self.store.flush()
        return True

    async def get_task_status(self, task_id: str) -> dict[str, Any] | None:
        self.leadership.require_leader()
        task = self.records.get(task_id)
        return None if task is None else _status(task)

    async def wait_for_task(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the task is final; its status. (Beyond the seed: no polling loop.)

        Raises ``ValueError`` for an unknown id and ``TimeoutError`` after ``timeout``.
        """
        self.leadership.require_leader()
        task = self.records.get(task_id)
        if task is None:
            raise ValueError(f"task_id: unknown task {task_id!r}")
        await self.outcomes.wait(task, timeout)
        # The record itself (the identity map's one copy): final, it moves no more.
        return _status(task)

    async def list_tasks(
        self,
        status: TaskStatus | str | list[TaskStatus | str] | None = None,
        task_type: str | None = None,
        agent_id: str | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """The tasks held, most recently created first, at most ``limit`` (1 to
        1000): those in one of the statuses given, of ``task_type``, held or run
        by ``agent_id`` (beyond the seed; see ``listing``)."""
        self.leadership.require_leader()
        return listing.list_tasks(self.records, status, task_type, agent_id, limit)

    async def get_stats(self) -> dict[str, Any]:
        """The seed's statistics, and (beyond it) ``refused_messages`` by reason,
        ``dead_letters`` by what they were, ``role`` and who is ``leader``."""
        refused = self.registry.refusals.snapshot()
        return {**self._stats.snapshot(self.registry, refused), **self.leadership.describe()}

    async def get_agents(self) -> list[AgentCapability]:
        """The registered agents (beyond the seed: for tools and tests). A
        standby raises ``NotLeader``: what it holds is not the fleet's state."""
        self.leadership.require_leader()
        return list(self.registry)

    async def get_queues(self) -> dict[str, list[str]]:
        """The task queues in use, by key, with the capabilities each needs
        (beyond the seed: for tools). A key is ``<task type>.<capability key>``."""
        self.leadership.require_leader()
        return {key: list(spec.capabilities) for key, spec in self.dispatch.queues.in_use.items()}


def _status(task: Task) -> dict[str, Any]:
    """``get_task_status``' answer for a record."""
    return {
        "task_id": task.task_id,
        "name": task.name,
        "status": task.status.value,
        "assigned_agent": task.assigned_agent,
        "created_at": task.created_at,
        "started_at": task.started_at,
        "completed_at": task.completed_at,
        "priority": task.priority.value,
        "progress": task.progress,
        "result": task.result,
        "error_message": task.error_message,
        # beyond the seed's keys
        "retry_count": task.retry_count,
        "traceback": task.traceback,
    }
