"""A bad event is dead-lettered, and must not fail the live task it names.

Events that cannot be parsed (or whose handling fails) go to the dead
letters like poison task messages do; only a dead-lettered *task message* of
the task's current attempt may end the task.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from agents import TaskContext
from broker import (
    BusConnectionError,
    BusSettings,
    ConsumeQueues,
    Control,
    DeadLetter,
    Event,
    MemoryBus,
    MessageTooLarge,
)
from orchestrator import MemoryStore, Task, TaskStatus
from orchestrator.models import Delivery
from tests.harness import FAST, Harness, wait_until


@pytest.mark.parametrize(
    "shape",
    [
        # A finished event that names the task and its attempt but does not parse.
        pytest.param({"outcome": "exploded"}, id="bad-outcome"),
        # One with no attempt at all.
        pytest.param({"outcome": "failed", "attempt": None}, id="no-attempt"),
    ],
)
async def test_unparseable_event_naming_a_running_task_leaves_it_running(
    harness: Harness, caplog: pytest.LogCaptureFixture, shape: dict
) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator")
    # Given a task running on an agent, held until the test lets it finish
    orchestrator = await harness.start_orchestrator()
    release = asyncio.Event()

    async def held(ctx: TaskContext) -> dict:
        await release.wait()
        return {"done": ctx.attempt}

    await harness.start_agent("worker", [], 1, held)
    task_id = await orchestrator.submit_task(
        name="t", description="", task_type="j", payload={}, max_retries=0
    )

    async def running() -> bool:
        return (await orchestrator.get_task_status(task_id))["status"] == "running"

    await wait_until(running, timeout=15)

    # When a malformed event naming that task (and its attempt) reaches the orchestrator
    body = {
        "v": 1,
        "kind": "task.finished",
        "task_id": task_id,
        "attempt": 1,
        "agent_id": "worker",
        **shape,
    }
    await harness.inject_event("task.finished.worker", json.dumps(body).encode())

    # Then the orchestrator gets its dead letter and only logs it
    def ignored() -> bool:
        return any(
            "not a task message" in r.getMessage() and task_id in r.getMessage()
            for r in caplog.records
        )

    async def handled() -> bool:
        status = (await orchestrator.get_task_status(task_id))["status"]
        return ignored() or status != "running"

    await wait_until(handled, timeout=15)
    status = await orchestrator.get_task_status(task_id)
    assert status["status"] == "running", status
    assert ignored()

    # And the task goes on to complete normally
    release.set()
    final = await orchestrator.wait_for_task(task_id, 15)
    assert final["status"] == "completed"
    assert final["result"] == {"done": 1}


async def test_a_dependent_too_large_to_publish_fails_and_its_siblings_still_run(
    harness: Harness,
) -> None:
    # Given two tasks whose results together exceed the largest message, a task
    # that depends on both, and a small one released at the same moment
    orchestrator = await harness.start_orchestrator()
    half = harness.settings.max_message_bytes * 6 // 10
    gate = asyncio.Event()

    async def big(ctx: TaskContext) -> dict:
        if ctx.payload.get("wait"):
            await gate.wait()
        return {"blob": "x" * half} if ctx.payload.get("big") else {"small": True}

    await harness.start_agent("worker", [], 3, big)
    job = {"description": "", "task_type": "j", "max_retries": 0}
    first = await orchestrator.submit_task(name="a", payload={"big": True}, **job)
    second = await orchestrator.submit_task(name="b", payload={"big": True, "wait": True}, **job)
    await orchestrator.wait_for_task(first, 15)
    too_large = await orchestrator.submit_task(
        name="too large", payload={}, dependencies=[first, second], **job
    )
    small = await orchestrator.submit_task(name="small", payload={}, dependencies=[second], **job)

    # When the last dependency completes and both are released
    gate.set()

    # Then the one that cannot be published fails with the reason, the other runs
    failed = await orchestrator.wait_for_task(too_large, 15)
    assert failed["status"] == "failed"
    assert "not published" in failed["error_message"]
    assert (await orchestrator.wait_for_task(small, 15))["status"] == "completed"


class _FailingPublishes(MemoryBus):
    """The in-process bus, with task publishes failing as during a broker outage."""

    fail_publishes = 0

    async def publish_task(self, message, **kwargs) -> None:
        if self.fail_publishes > 0:
            self.fail_publishes -= 1
            raise BusConnectionError("broker unreachable (injected)")
        await super().publish_task(message, **kwargs)


async def test_dependents_released_while_the_bus_fails_are_published_later(
    prefix: str,
) -> None:
    # Given a task with three dependents, on a bus whose next task publish fails
    harness = Harness("memory", BusSettings(prefix=prefix))
    bus = harness.use_memory_bus(_FailingPublishes(settings=harness.settings))
    try:
        orchestrator = await harness.start_orchestrator(
            FAST.model_copy(update={"lost_retry_grace": 0.2})
        )
        gate = asyncio.Event()

        async def work(ctx: TaskContext) -> dict:
            if ctx.payload.get("wait"):
                await gate.wait()
            return {"attempt": ctx.attempt}

        await harness.start_agent("worker", [], 3, work)
        job = {"description": "", "task_type": "j", "max_retries": 0}
        dep = await orchestrator.submit_task(name="dep", payload={"wait": True}, **job)
        dependents = [
            await orchestrator.submit_task(name=f"d{i}", payload={}, dependencies=[dep], **job)
            for i in range(3)
        ]

        # When the dependency completes and publishing its first dependent fails
        bus.fail_publishes = 1
        gate.set()

        # Then all three are published later by the watch and complete
        done = [await orchestrator.wait_for_task(t, 15) for t in dependents]
        assert [d["status"] for d in done] == ["completed"] * 3
        assert bus.fail_publishes == 0
        # and handling the dependency's result did not fail (no dead letter)
        assert bus.dead_letters == []
    finally:
        await harness.close()


def test_a_dead_letter_says_the_kind_its_body_says() -> None:
    assert DeadLetter(b'{"v": 1, "kind": "task.finished"}', "bad").kind == "task.finished"
    assert DeadLetter(b'{"kind": "task", "task_id": "t"}', "bad", "t:1").kind == "task"
    assert DeadLetter(b"not json", "bad", "t:1").kind is None
    assert DeadLetter(b"[1, 2]", "bad").kind is None
    assert DeadLetter(b'{"kind": 3}', "bad").kind is None
    assert DeadLetter(b"[" * 100_000, "bad").kind is None  # too deep to parse


class _BrokerDown(MemoryBus):
    """The in-process bus, with everything the orchestrator asks of the broker
    for tasks failing while ``down`` (events still flow), as during an outage;
    ``fail_consume_orders`` fails that many ``ConsumeQueues`` commands."""

    down = False
    fail_consume_orders = 0
    failures = 0

    def _fail(self) -> None:
        self.failures += 1
        raise BusConnectionError("broker unreachable (injected)")

    async def declare_task_queue(self, queue_key: str) -> None:
        if self.down:
            self._fail()
        await super().declare_task_queue(queue_key)

    async def publish_task(self, message, **kwargs) -> None:
        if self.down:
            self._fail()
        await super().publish_task(message, **kwargs)

    async def queue_depth(self, queue_key: str) -> int:
        if self.down:
            self._fail()
        return await super().queue_depth(queue_key)

    async def publish_control(self, command: Control, *, agent_id: str | None = None) -> None:
        if isinstance(command, ConsumeQueues) and self.fail_consume_orders > 0:
            self.fail_consume_orders -= 1
            self._fail()
        if self.down:
            self._fail()
        await super().publish_control(command, agent_id=agent_id)


async def _on_failing_bus(prefix: str, bus_class: type[MemoryBus] = _BrokerDown) -> Harness:
    harness = Harness("memory", BusSettings(prefix=prefix))
    harness.use_memory_bus(bus_class(settings=harness.settings))
    return harness


async def test_dependents_released_while_the_broker_is_down_reach_their_new_queue_later(
    prefix: str,
) -> None:
    # Given a task with three dependents, two of them needing a capability no
    # task needed yet (a workflow's second stage: a new queue), and an agent for both
    harness = await _on_failing_bus(prefix)
    bus = harness.new_bus()  # the failing bus
    try:
        orchestrator = await harness.start_orchestrator(
            FAST.model_copy(update={"lost_retry_grace": 0.2})
        )
        gate = asyncio.Event()

        async def work(ctx: TaskContext) -> dict:
            if ctx.payload.get("wait"):
                await gate.wait()
            return {"attempt": ctx.attempt}

        await harness.start_agent("worker", ["stage2"], 3, work)
        job = {"description": "", "task_type": "j", "max_retries": 0}
        dep = await orchestrator.submit_task(name="dep", payload={"wait": True}, **job)
        dependents = [
            await orchestrator.submit_task(
                name=f"d{i}", payload={}, dependencies=[dep], required_capabilities=caps, **job
            )
            for i, caps in enumerate([[], ["stage2"], ["stage2"]])
        ]

        # When the dependency completes while the broker takes no task, declares no
        # queue and passes no command
        bus.down = True
        gate.set()

        # Then every dependent is marked queued (none is left pending), the bus
        # having refused at least one of them
        async def all_queued() -> bool:
            statuses = [(await orchestrator.get_task_status(t))["status"] for t in dependents]
            return statuses == ["pending"] * 3 and bus.failures > 0

        await wait_until(all_queued, timeout=15)
        assert (await orchestrator.get_task_status(dep))["status"] == "completed"

        # And once the broker is back, the watch publishes them, the new queue is
        # declared and the agent told to consume it: all three complete
        bus.down = False
        done = [await orchestrator.wait_for_task(t, 15) for t in dependents]
        assert [d["status"] for d in done] == ["completed"] * 3
        # and handling the dependency's result did not fail (no dead letter)
        assert bus.dead_letters == []
    finally:
        await harness.close()


async def test_agents_not_told_of_a_new_queue_are_told_by_the_next_publish(prefix: str) -> None:
    # Given an agent, and a broker that loses the next order to consume queues
    harness = await _on_failing_bus(prefix)
    bus = harness.new_bus()  # the failing bus
    try:
        orchestrator = await harness.start_orchestrator()
        await harness.start_agent("worker", ["stage2"], 1)
        bus.fail_consume_orders = 1
        job = {
            "name": "t",
            "description": "",
            "task_type": "j",
            "payload": {},
            "required_capabilities": ["stage2"],
        }

        # When a task needing a new queue is submitted: the agent cannot be told of it
        with pytest.raises(BusConnectionError):
            await orchestrator.submit_task(**job)

        # Then the submission failed without a trace
        assert await orchestrator.store.tasks() == []
        stats = await orchestrator.get_stats()
        assert (stats["tasks_created"], stats["pending_tasks"]) == (0, 0)

        # And the next task of that queue tells the agent, which runs it
        task_id = await orchestrator.submit_task(**job)
        status = await orchestrator.wait_for_task(task_id, 15)
        assert status["status"] == "completed"
        assert bus.fail_consume_orders == 0
    finally:
        await harness.close()


class _FlushFailsAfter(MemoryStore):
    """An in-memory store whose flush right after ``name`` is saved as queued
    fails once (a disk error, not a bus one)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.armed = False
        self.failed = False

    async def save_task(self, task: Task) -> None:
        await super().save_task(task)
        if (
            task.name == self.name
            and task.status is TaskStatus.PENDING
            and task.attempt > 0
            and not self.failed
        ):
            self.armed = True

    async def flush(self) -> None:
        if self.armed:
            self.armed, self.failed = False, True
            raise OSError("disk full (injected)")
        await super().flush()


async def test_a_released_dependent_whose_save_fails_is_published_later(harness: Harness) -> None:
    # Given a task with two dependents, and a store that fails once when the
    # first of them is written as queued
    store = _FlushFailsAfter("d0")
    orchestrator = await harness.start_orchestrator(
        FAST.model_copy(update={"lost_retry_grace": 0.2}), store=store
    )
    gate = asyncio.Event()

    async def work(ctx: TaskContext) -> dict:
        if ctx.payload.get("wait"):
            await gate.wait()
        return {"attempt": ctx.attempt}

    await harness.start_agent("worker", [], 2, work)
    job = {"description": "", "task_type": "j", "max_retries": 0}
    dep = await orchestrator.submit_task(name="dep", payload={"wait": True}, **job)
    d0 = await orchestrator.submit_task(name="d0", payload={}, dependencies=[dep], **job)
    d1 = await orchestrator.submit_task(name="d1", payload={}, dependencies=[dep], **job)

    # When the dependency completes and releasing the first dependent fails
    gate.set()

    # Then both still run: the second released as usual, the first by the watch
    first = await orchestrator.wait_for_task(d0, 15)
    second = await orchestrator.wait_for_task(d1, 15)
    assert store.failed
    assert first["status"] == "completed"
    assert second["status"] == "completed"
    assert (await orchestrator.get_task_status(dep))["status"] == "completed"


class _ConfirmLost(MemoryBus):
    """The in-process bus, whose next task publish reaches its queue but whose
    confirm is lost: the publisher hears a connection error once ``late`` (awaited
    with the message) returns, or never while ``hang``. While ``hold_events``,
    task events wait in a backlog (``held``) until ``release_events``, as they do
    in the orchestrator's events queue while it is busy."""

    late = None
    hang = False
    hold_events = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.held: list[Event] = []

    async def publish_task(self, message, **kwargs) -> None:
        await super().publish_task(message, **kwargs)
        late, self.late = self.late, None
        if self.hang:
            self.hang = False
            await asyncio.Event().wait()
        if late is not None:
            await late(message)
            raise BusConnectionError("confirm lost (injected)")

    async def publish_event(self, event: Event) -> None:
        if self.hold_events and event.kind.startswith("task."):
            self._require()
            self.held.append(event)
            return
        await super().publish_event(event)

    async def release_events(self) -> None:
        self.hold_events = False
        held, self.held = self.held, []
        for event in held:
            await super().publish_event(event)


@pytest.mark.parametrize("then", ["queued", "ran-unseen", "running", "completed"])
async def test_a_submission_whose_confirm_is_lost_is_accepted_and_runs_once(
    prefix: str, then: str
) -> None:
    # Given a bus that routes the next task but loses its confirm, failing the
    # publish at once while no agent runs (queued), once an agent ran it with its
    # events still waiting to be handled (ran-unseen), or once the orchestrator
    # saw it start (running) or end (completed)
    harness = await _on_failing_bus(prefix, _ConfirmLost)
    bus = harness.new_bus()  # the failing bus
    try:
        orchestrator = await harness.start_orchestrator()
        gate = asyncio.Event()
        ran: list[int] = []

        async def held(ctx: TaskContext) -> dict:
            ran.append(ctx.attempt)
            await gate.wait()
            return {"attempt": ctx.attempt}

        if then != "queued":
            await harness.start_agent("worker", [], 1, held)
        bus.hold_events = then == "ran-unseen"

        async def late(message) -> None:
            if then in ("completed", "ran-unseen"):
                gate.set()
            if then == "queued":
                return

            async def there() -> bool:
                if then == "ran-unseen":
                    return any(e.kind == "task.finished" for e in bus.held)
                task = await orchestrator.store.get_task(message.task_id)
                return task is not None and task.status.value == then

            await wait_until(there, timeout=15)

        bus.late = late

        # When the task is submitted
        task_id = await orchestrator.submit_task(
            name="t", description="", task_type="j", payload={}, max_retries=0
        )

        # Then the submission succeeds (the message may have been routed: it is
        # accepted), and the task completes once, its agent's slot freed
        if then == "ran-unseen":
            task = await orchestrator.store.get_task(task_id)
            assert (task.status, task.attempt) == (TaskStatus.PENDING, 1)
            await bus.release_events()
        if then == "queued":
            await harness.start_agent("worker", [], 1, held)
        gate.set()
        status = await orchestrator.wait_for_task(task_id, 15)
        assert status["status"] == "completed"
        assert status["result"] == {"attempt": 1}
        assert ran == [1]
        (agent,) = await orchestrator.get_agents()
        assert (agent.running, agent.current_load) == (set(), 0)
        stats = await orchestrator.get_stats()
        assert (stats["tasks_created"], stats["completed_tasks"]) == (1, 1)
    finally:
        await harness.close()


async def test_a_submission_whose_publish_fails_unsure_is_published_again_by_the_watch(
    prefix: str,
) -> None:
    # Given an agent, and a bus whose next task publish fails with a connection
    # error without the message reaching any queue (the caller cannot know that)
    harness = Harness("memory", BusSettings(prefix=prefix))
    bus = harness.use_memory_bus(_FailingPublishes(settings=harness.settings))
    try:
        orchestrator = await harness.start_orchestrator(
            FAST.model_copy(update={"lost_retry_grace": 0.2})
        )
        ran: list[int] = []

        async def work(ctx: TaskContext) -> dict:
            ran.append(ctx.attempt)
            return {"attempt": ctx.attempt}

        await harness.start_agent("worker", [], 1, work)
        bus.fail_publishes = 1

        # When a task is submitted
        task_id = await orchestrator.submit_task(
            name="t", description="", task_type="j", payload={}, max_retries=0
        )

        # Then it is accepted, and the watch publishes it again: it runs once
        assert bus.fail_publishes == 0
        status = await orchestrator.wait_for_task(task_id, 15)
        assert status["status"] == "completed"
        assert status["result"] == {"attempt": 2}
        assert ran == [2]
        stats = await orchestrator.get_stats()
        assert (stats["tasks_created"], stats["completed_tasks"]) == (1, 1)
    finally:
        await harness.close()


async def test_a_submission_too_large_to_publish_fails_without_a_trace(harness: Harness) -> None:
    # Given two completed tasks whose results together exceed the largest message
    orchestrator = await harness.start_orchestrator()
    half = harness.settings.max_message_bytes * 6 // 10

    async def big(ctx: TaskContext) -> dict:
        return {"blob": "x" * half}

    await harness.start_agent("worker", [], 2, big)
    job = {"description": "", "task_type": "j", "payload": {}, "max_retries": 0}
    deps = [await orchestrator.submit_task(name=f"dep{i}", **job) for i in range(2)]
    for dep in deps:
        assert (await orchestrator.wait_for_task(dep, 15))["status"] == "completed"

    # When a task depending on both is submitted: its message is refused unsent
    with pytest.raises(MessageTooLarge):
        await orchestrator.submit_task(name="too large", dependencies=deps, **job)

    # Then the submission failed without a trace
    assert sorted(t.task_id for t in await orchestrator.store.tasks()) == sorted(deps)
    stats = await orchestrator.get_stats()
    assert (stats["tasks_created"], stats["pending_tasks"]) == (2, 0)


async def test_a_submission_on_a_closed_bus_fails_without_a_trace(harness: Harness) -> None:
    # Given an orchestrator that published to a queue already, whose bus is then closed
    # (and a submit bound no test waits out)
    orchestrator = await harness.start_orchestrator(FAST.model_copy(update={"submit_timeout": 600}))
    await harness.start_agent("worker", [], 1)
    job = {"name": "t", "description": "", "task_type": "j", "payload": {}}
    first = await orchestrator.submit_task(**job)
    assert (await orchestrator.wait_for_task(first, 15))["status"] == "completed"
    await orchestrator.bus.close()

    # When a task is submitted: nothing can be sent, and a closed bus does not
    # come back, so the submit does not wait for it
    with pytest.raises(ConnectionError, match="closed"):
        async with asyncio.timeout(60):
            await orchestrator.submit_task(**job)

    # Then the submission failed without a trace
    assert [t.task_id for t in await orchestrator.store.tasks()] == [first]
    stats = await orchestrator.get_stats()
    assert (stats["tasks_created"], stats["pending_tasks"]) == (1, 0)


class _StoreClosesAfterConfirm(MemoryStore):
    """An in-memory store that is closed (as by a racing ``stop()``) just when a
    confirmed publish of ``name`` is saved."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.failed = False

    async def save_task(self, task: Task) -> None:
        confirmed = task.delivery is Delivery.CONFIRMED
        if task.name == self.name and confirmed and not self.failed:
            self.failed = True
            raise RuntimeError("the store is closed (injected)")
        await super().save_task(task)


@pytest.mark.parametrize("bus_kind", ["memory"], indirect=True)
async def test_a_submission_whose_store_fails_after_the_confirm_is_accepted(
    harness: Harness,
) -> None:
    # Given a store that fails saving the confirm of the next task's publish
    store = _StoreClosesAfterConfirm("t")
    orchestrator = await harness.start_orchestrator(store=store)
    ran: list[int] = []

    async def work(ctx: TaskContext) -> dict:
        ran.append(ctx.attempt)
        return {"attempt": ctx.attempt}

    await harness.start_agent("worker", [], 1, work)

    # When the task is submitted and published
    task_id = await orchestrator.submit_task(
        name="t", description="", task_type="j", payload={}, max_retries=0
    )

    # Then the publish counts as done: the id is returned and the task runs once
    assert store.failed
    status = await orchestrator.wait_for_task(task_id, 15)
    assert status["status"] == "completed"
    assert ran == [1]


async def test_a_submission_cancelled_while_it_publishes_is_kept_and_runs(prefix: str) -> None:
    # Given a bus that routes the next task but never confirms it (no agent yet)
    harness = await _on_failing_bus(prefix, _ConfirmLost)
    bus = harness.new_bus()  # the failing bus
    try:
        orchestrator = await harness.start_orchestrator()
        bus.hang = True

        # When the caller gives up on the submission while it waits for the confirm
        submit = asyncio.ensure_future(
            orchestrator.submit_task(name="t", description="", task_type="j", payload={})
        )

        async def published() -> bool:
            return not bus.hang

        await wait_until(published, timeout=15)
        submit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submit

        # Then the task was not deleted: the message that reached the queue runs
        (task,) = await orchestrator.store.tasks()
        assert (task.status, task.attempt) == (TaskStatus.PENDING, 1)
        ran: list[int] = []

        async def work(ctx: TaskContext) -> dict:
            ran.append(ctx.attempt)
            return {"attempt": ctx.attempt}

        await harness.start_agent("worker", [], 1, work)
        status = await orchestrator.wait_for_task(task.task_id, 15)
        assert status["status"] == "completed"
        assert status["result"] == {"attempt": 1}
        assert ran == [1]
    finally:
        await harness.close()
