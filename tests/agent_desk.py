"""A stand-in for the orchestrator, for tests of what an agent does on the wire.

``Desk`` publishes task messages as the orchestrator does, tells an agent
which queues to consume (and its limit), hears every event an agent
publishes, answers a ``TaskAssigned`` with ``confirm`` as the test says
(``ProceedTask`` unless told otherwise), and reads the dead letters. Tests
wait on what it heard (``wait_for``), never for a while.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from broker import (
    CancelTask,
    CommunicationBus,
    ConsumeQueues,
    DeadLetter,
    Event,
    ProceedTask,
    Subscription,
    TaskAssigned,
    TaskFinished,
    TaskMessage,
    TaskStarted,
    capability_key,
)
from tests.harness import Harness

WAIT = 60.0


class Desk:
    def __init__(self, harness: Harness, capabilities: tuple[str, ...] = ("work",)) -> None:
        self.harness = harness
        self.key = capability_key(capabilities)
        harness.queue_keys.add(self.key)
        self.bus: CommunicationBus | None = None
        self.events: list[Event] = []
        self.dead: list[DeadLetter] = []
        self.answer: Callable[[TaskAssigned], bool | None] = lambda event: True
        """Whether to let a redelivered attempt run (else it is cancelled; None:
        no answer, as an orchestrator that is down)."""
        self._changed = asyncio.Condition()
        self._subscriptions: list[Subscription] = []

    async def open(self) -> Desk:
        self.bus = await self.harness.connected_bus()
        self._subscriptions.append(
            await self.bus.subscribe_events(self._on_event, patterns=["task.#", "agent.#"])
        )
        self._subscriptions.append(await self.bus.subscribe_dead_letters(self._on_dead))
        await self.bus.declare_task_queue(self.key)
        return self

    async def close(self) -> None:
        for subscription in self._subscriptions:
            await subscription.close()

    async def _on_event(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, TaskAssigned) and event.confirm:
            assert self.bus is not None
            word = self.answer(event)
            if word is not None:
                command = (ProceedTask if word else CancelTask)(
                    task_id=event.task_id, attempt=event.attempt
                )
                await self.bus.publish_control(command, agent_id=event.agent_id)
        await self._poke()

    async def _on_dead(self, letter: DeadLetter) -> None:
        self.dead.append(letter)
        await self._poke()

    async def _poke(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, condition: Callable[[], Any], timeout: float = WAIT) -> Any:
        """Until ``condition()`` is true (looked at whenever something is heard)."""
        async with self._changed:
            return await asyncio.wait_for(self._changed.wait_for(condition), timeout)

    # ------------------------------------------------------------------ telling
    def message(self, **fields: Any) -> TaskMessage:
        fields.setdefault("task_id", f"task_{uuid.uuid4().hex[:12]}")
        fields.setdefault("attempt", 1)
        fields.setdefault("name", "job")
        fields.setdefault("task_type", "job")
        fields.setdefault("payload", {})
        fields.setdefault("priority", "medium")
        fields.setdefault("timeout", 300.0)
        fields.setdefault("estimated_duration", 1.0)
        return TaskMessage(**fields)

    async def publish(self, message: TaskMessage) -> TaskMessage:
        assert self.bus is not None
        await self.bus.publish_task(message, queue_key=self.key, priority=5)
        return message

    async def consume(self, agent_id: str, *, max_concurrent_tasks: int | None = None) -> None:
        assert self.bus is not None
        await self.bus.publish_control(
            ConsumeQueues(queue_keys=[self.key], max_concurrent_tasks=max_concurrent_tasks),
            agent_id=agent_id,
        )

    # ------------------------------------------------------------------ what was heard
    def of(self, kind: type, task_id: str | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind) and (task_id is None or getattr(e, "task_id", None) == task_id)
        ]

    def started(self, task_id: str | None = None) -> list[TaskStarted]:
        """The starts told: each ``TaskStarted``, and each attempt whose final
        event says when it started and that had none (a quick one: its agent
        folds its start into its final event), in the order heard."""
        told: list[TaskStarted] = []
        seen: set[tuple[str, int]] = set()
        for e in self.events:
            if task_id is not None and getattr(e, "task_id", None) != task_id:
                continue
            if isinstance(e, TaskStarted):
                told.append(e)
                seen.add((e.task_id, e.attempt))
            elif isinstance(e, TaskFinished) and e.started_at is not None:
                if (e.task_id, e.attempt) not in seen:
                    seen.add((e.task_id, e.attempt))
                    told.append(
                        TaskStarted(
                            task_id=e.task_id,
                            attempt=e.attempt,
                            agent_id=e.agent_id,
                            at=e.started_at,
                        )
                    )
        return told

    def finished(self, task_id: str | None = None) -> list[TaskFinished]:
        return self.of(TaskFinished, task_id)

    def assigned(self, task_id: str | None = None) -> list[TaskAssigned]:
        return self.of(TaskAssigned, task_id)
