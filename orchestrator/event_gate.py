"""The gate every event passes before it is handled: who may say what.

The bus is shared with strangers, so an event is believed only from the broker
user its agent id is bound to (``current_sender``: RabbitMQ's checked
``user_id``); an announcement must pass ``register_agent``'s own validation; a
task event must come from an agent that is registered and can run the task's
queue, and once the attempt has a live holder, from that holder alone. A dead
letter fails its task only if it comes from our own user or from the user of
the agent that held it (of one that could take it, for a queued task). Cheap
for what fails: a flood costs lookups, no publish and no write.
"""

from __future__ import annotations

from broker import (
    AGENT_ID_PATTERN,
    AgentAnnounced,
    AgentHeartbeat,
    CommunicationBus,
    DeadLetter,
    Event,
    TaskAssigned,
    TaskFinished,
    TaskProgress,
    TasksReported,
    TaskStarted,
)
from broker.envelope import Sender, current_sender

from .models import Task
from .placement import QueueSpec, can_run
from .records import TaskRecords
from .registry import AgentRegistry
from .validation import validate_agent, validate_task_types


def stale(task: Task | None, attempt: int) -> bool:
    """Whether an event of ``attempt`` no longer concerns the task: unknown
    (forgotten, or a submission that failed after all), ended, or superseded."""
    return task is None or task.status.is_final or attempt != task.attempt


def _refused(reason: str, event: Event, why: str) -> tuple[str, str]:
    task = f"task {event.task_id} attempt {event.attempt}"  # type: ignore[attr-defined]
    return reason, f"{event.kind} of {task} from agent {event.agent_id}{why}"


class EventGate:
    """Why an event, or a dead letter, is not to be believed; None if it passes."""

    def __init__(
        self, bus: CommunicationBus, records: TaskRecords, registry: AgentRegistry
    ) -> None:
        self.bus = bus
        self.records = records
        self.registry = registry

    async def refusal(self, event: Event, sender: Sender | None) -> tuple[str, str] | None:
        """Why ``event`` (from ``sender``; None: an in-process call) is not to be
        believed, as (reason, detail); None if it passes. Cheap for what fails:
        a flood of them costs lookups, no publish and no write."""
        agent_id = event.agent_id
        if not AGENT_ID_PATTERN.match(agent_id):
            return "invalid_agent_id", f"{event.kind} for agent id {agent_id[:140]!r}"
        if isinstance(event, AgentAnnounced):
            try:
                validate_agent(agent_id, event.capabilities, event.max_concurrent_tasks)
                validate_task_types(event.task_types)
            except ValueError as exc:
                return "invalid_announcement", f"agent {agent_id}: {exc}"
        if sender is None:
            return None  # in-process: trusted (the bus never calls without a sender)
        known = agent_id in self.registry
        user = sender.user
        if user is None:
            return "no_user", f"{event.kind} for agent {agent_id} without a user_id"
        bound = self.registry.user_of(agent_id)
        if bound is not None and bound != user:
            return (
                "wrong_user",
                f"{event.kind} for agent {agent_id} from user {user!r}; it is {bound!r}'s",
            )
        if bound is None:
            if isinstance(event, AgentAnnounced):
                if not self.registry.may_bind(user):
                    return "too_many_agents", f"announcement of agent {agent_id} by user {user!r}"
                await self.registry.bind(agent_id, user)
            elif known:
                # Registered by API (or stored before identities were): it is
                # believed once it announces itself, which binds it to its user.
                if isinstance(event, AgentHeartbeat):
                    await self.registry.ask_to_announce(agent_id)
                return "unannounced", f"{event.kind} for agent {agent_id}, not announced yet"
        if isinstance(event, AgentHeartbeat) and not known:
            await self.registry.ask_to_announce(agent_id)
            return "unknown_agent", f"heartbeat of agent {agent_id}, which is not registered"
        if isinstance(event, TasksReported) and not known:
            return "unknown_agent", f"{event.kind} of agent {agent_id}, which is not registered"
        if isinstance(event, (TaskAssigned, TaskStarted, TaskProgress, TaskFinished)):
            return self._task_event_refusal(event)
        return None

    def _task_event_refusal(
        self, event: TaskAssigned | TaskStarted | TaskProgress | TaskFinished
    ) -> tuple[str, str] | None:
        agent = self.registry.get(event.agent_id)
        if agent is None:  # (a refusal's detail is worded only when there is one)
            return _refused("unknown_agent", event, ", which is not registered")
        task = self.records.get(event.task_id)
        if stale(task, event.attempt):
            return None  # stale: its handler drops it (and tells a real agent to)
        if not can_run(agent, QueueSpec.of(task)):
            return _refused("cannot_run", event, ", which cannot run its queue")
        holder = task.assigned_agent
        confirm = isinstance(event, TaskAssigned) and event.confirm
        if holder not in (None, event.agent_id) and holder in self.registry and not confirm:
            # (A confirm of a copy waits for the holder: see on_assigned.)
            return _refused("not_holder", event, f"; agent {holder} holds it")
        return None

    def dead_letter_refusal(self, letter: DeadLetter, task: Task) -> tuple[str, str] | None:
        """Why a dead letter of ``task``'s current attempt is not to fail it."""
        if current_sender() is None:
            return None  # in-process
        user = letter.sender
        if user is not None and user == self.bus.user:
            # Our own user: the broker dead-lettered our task message (x-death keeps
            # its user_id), or a process with our login (one trust domain) did.
            return None
        holder = self.registry.get(task.assigned_agent)
        if holder is not None:
            if user is not None and self.registry.user_of(holder.agent_id) == user:
                return None
        elif user is not None and any(
            self.registry.user_of(a.agent_id) == user and can_run(a, QueueSpec.of(task))
            for a in self.registry
        ):
            return None  # queued: an agent of this user that can take it gave it up
        return (
            "dead_letter_not_trusted",
            f"dead letter of task {task.task_id} attempt {task.attempt} from user {user!r}"
            f"{' (x-death)' if letter.by_broker else ''}: neither the broker's nor its agent's",
        )
