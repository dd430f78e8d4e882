"""The orchestrator restarts while a retry waits: the broker kept the timer."""

from __future__ import annotations

import asyncio
import logging
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents import TaskContext
from broker import (
    AgentAnnounced,
    CancelTask,
    CommunicationBus,
    ConsumeQueues,
    Control,
    TaskMessage,
    route_key,
)
from broker.messages import CancelTasks
from orchestrator import (
    RunDeadlines,
    SQLiteStore,
    Task,
    TaskOrchestrator,
    TaskPriority,
    TaskStatus,
)
from orchestrator import registry as agent_registry
from orchestrator import timeouts as timeouts_module
from orchestrator.models import Delivery
from tests.harness import FAST, Harness, wait_until


async def test_retry_scheduled_before_a_restart_runs_after_it(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a task whose first attempt failed, its retry waiting a second
    path = tmp_path / "state.sqlite"
    settings = FAST.model_copy(update={"retry_base_delay": 1.0, "retry_max_delay": 2.0})
    first = await harness.start_orchestrator(settings, store=SQLiteStore(path))

    async def fails_once(ctx: TaskContext) -> dict:
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return {"attempt": ctx.attempt}

    await harness.start_agent("worker", [], 2, fails_once)
    task_id = await first.submit_task(name="t", description="", task_type="j", payload={})

    async def retry_waiting() -> bool:
        # pending with its retry in the broker's delay tier (its publish done: a
        # stop cancels an event handler in the middle, and a retry cut off so is
        # only found again after lost_retry_grace)
        status = await first.get_task_status(task_id)
        task = first.records.get(task_id)
        return (
            status["retry_count"] == 1
            and status["status"] == "pending"
            and task.delivery is Delivery.DELAYED
        )

    await wait_until(retry_waiting, timeout=10)

    # When the orchestrator stops and another starts on the same state
    await first.stop()
    bus = harness.new_bus()
    await bus.connect()
    second = TaskOrchestrator(bus, settings=settings, store=SQLiteStore(path))
    harness.orchestrator = second
    await second.start()

    # Then the retry arrives from the broker and the new orchestrator completes it
    status = await second.wait_for_task(task_id, timeout=15)
    assert status["status"] == "completed"
    assert status["result"] == {"attempt": 2}
    assert status["retry_count"] == 1


# ----------------------------------------------------- a restart while releasing dependents


def _task(task_id: str, status: TaskStatus, deps: list[str] = (), **changes) -> Task:
    task = Task(
        task_id=task_id,
        name=f"name of {task_id}",
        description="",
        task_type="j",
        priority=TaskPriority.MEDIUM,
        payload={"id": task_id},
        dependencies=list(deps),
        status=status,
    )
    for key, value in changes.items():
        setattr(task, key, value)
    return task


async def _write(path: Path, *tasks: Task) -> None:
    """The store as an orchestrator killed mid-way left it."""
    store = SQLiteStore(path)
    for task in tasks:
        await store.save_task(task)
    await store.flush()
    await store.close()


async def test_dependents_left_pending_by_a_crash_run_after_a_restart(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a store where a dependency completed (and was saved) but the orchestrator
    # died before publishing its dependents: they are still pending
    path = tmp_path / "state.sqlite"
    await _write(
        path,
        _task("dep", TaskStatus.COMPLETED, result={"dep": 1}, attempt=1, completed_at=1.0),
        _task("other", TaskStatus.COMPLETED, result={"other": 2}, attempt=1, completed_at=1.0),
        _task("first", TaskStatus.PENDING, ["dep"]),
        _task("second", TaskStatus.PENDING, ["dep", "other"]),
        _task("later", TaskStatus.PENDING, ["first"]),  # waits, then runs
    )

    # When a new orchestrator starts on that file, with an agent
    orchestrator = await harness.start_orchestrator(store=SQLiteStore(path))

    async def deps(ctx: TaskContext) -> dict:
        return {"deps": ctx.dependency_results}

    await harness.start_agent("worker", [], 3, deps)

    # Then every dependent runs, with its dependencies' results
    first = await orchestrator.wait_for_task("first", 15)
    second = await orchestrator.wait_for_task("second", 15)
    later = await orchestrator.wait_for_task("later", 15)
    assert first["status"] == "completed"
    assert first["result"] == {"deps": {"dep": {"dep": 1}}}
    assert second["result"] == {"deps": {"dep": {"dep": 1}, "other": {"other": 2}}}
    assert later["result"] == {"deps": {"first": first["result"]}}
    assert (await orchestrator.get_stats())["completed_tasks"] == 5


@pytest.mark.parametrize(
    ("dead", "expected"),
    [
        (TaskStatus.FAILED, "failed"),
        (TaskStatus.TIMEOUT, "failed"),
        (TaskStatus.CANCELLED, "cancelled"),
    ],
)
async def test_dependents_of_a_dead_dependency_end_after_a_restart(
    harness: Harness, tmp_path: Path, dead: TaskStatus, expected: str
) -> None:
    # Given a store where a dependency ended without completing but its
    # dependents (and theirs) were never ended
    path = tmp_path / "state.sqlite"
    await _write(
        path,
        _task("dep", dead, attempt=1, completed_at=1.0, error_message="boom"),
        _task("child", TaskStatus.PENDING, ["dep"]),
        _task("grandchild", TaskStatus.PENDING, ["child"]),
    )

    # When a new orchestrator starts on that file
    orchestrator = await harness.start_orchestrator(store=SQLiteStore(path))

    # Then they end, each naming the dependency that doomed it, as without a restart
    child = await orchestrator.wait_for_task("child", 15)
    grandchild = await orchestrator.wait_for_task("grandchild", 15)
    assert child["status"] == expected
    assert child["error_message"] == f"dependency dep (name of dep) ended {dead.value}"
    assert grandchild["status"] == expected
    assert grandchild["error_message"] == f"dependency child (name of child) ended {expected}"

    # And that is what the file says for the next orchestrator
    await orchestrator.stop()
    harness.orchestrator = None
    again = SQLiteStore(path)
    saved = {t.task_id: t.status.value for t in await again.tasks()}
    await again.close()
    assert saved == {"dep": dead.value, "child": expected, "grandchild": expected}


async def test_task_saved_as_queued_but_never_published_is_published_after_a_restart(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a store where a task was saved as queued (attempt 1), in flight,
    # and the orchestrator died before the broker confirmed the message
    path = tmp_path / "state.sqlite"
    await _write(
        path,
        _task("dep", TaskStatus.COMPLETED, result={"dep": 1}, attempt=1, completed_at=1.0),
        _task("lost", TaskStatus.PENDING, ["dep"], attempt=1, retry_due=time.time()),
    )

    # When a new orchestrator starts on that file, with an agent
    settings = FAST.model_copy(update={"lost_retry_grace": 0.3})
    orchestrator = await harness.start_orchestrator(settings, store=SQLiteStore(path))

    async def attempt(ctx: TaskContext) -> dict:
        return {"attempt": ctx.attempt, "deps": ctx.dependency_results}

    await harness.start_agent("worker", [], 1, attempt)

    # Then, its queue being empty, it is published again and runs
    status = await orchestrator.wait_for_task("lost", 15)
    assert status["status"] == "completed"
    assert status["result"] == {"attempt": 2, "deps": {"dep": {"dep": 1}}}


def _count_depth_looks(bus: CommunicationBus) -> list[str]:
    """The queue-depth look-ups made on ``bus`` from now on (the broker answers
    them as ever): how a test sees that the watch of queued tasks ran."""
    looks: list[str] = []
    real = bus.queue_depth

    async def queue_depth(queue_key: str) -> int:
        looks.append(queue_key)
        return await real(queue_key)

    bus.queue_depth = queue_depth  # type: ignore[method-assign]
    return looks


async def _queued_in_its_queue(harness: Harness, path: Path) -> Task:
    """A store with a task queued (attempt 1) and overdue, in flight when saved,
    and its message waiting in its queue, no agent to take it yet."""
    task = _task("queued", TaskStatus.PENDING, attempt=1, retry_due=time.time() - 60)
    await _write(path, task)
    bus = harness.new_bus()
    if not bus.is_connected:
        await bus.connect()
    message = TaskMessage(
        task_id=task.task_id,
        attempt=1,
        name=task.name,
        task_type=task.task_type,
        payload=task.payload,
        priority=task.priority.value,
        timeout=task.timeout,
        estimated_duration=task.estimated_duration,
    )
    await bus.publish_task(message, queue_key=route_key(task.task_type, []), priority=1)
    return task


async def test_task_queued_before_a_restart_is_not_published_twice(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a queued task, overdue, whose message waits in its queue, and no agent yet
    path = tmp_path / "state.sqlite"
    await _queued_in_its_queue(harness, path)

    # When a new orchestrator starts and watches it past its grace, looking at
    # its queue in two rounds at least
    settings = FAST.model_copy(update={"lost_retry_grace": 0.2})
    orchestrator = await harness.start_orchestrator(settings, store=SQLiteStore(path))
    looks = _count_depth_looks(orchestrator.bus)  # before the first round (monitor_interval)

    async def looked_twice() -> bool:
        task = await orchestrator.store.get_task("queued")
        return len(looks) >= 2 or task.attempt > 1

    await wait_until(looked_twice, timeout=15)

    # Then it found the message there and published no second attempt
    assert (await orchestrator.store.get_task("queued")).attempt == 1
    assert looks[:2] == [route_key("j", [])] * 2

    # And the message in the queue is the one that runs
    async def attempt(ctx: TaskContext) -> dict:
        return {"attempt": ctx.attempt}

    await harness.start_agent("worker", [], 1, attempt)
    status = await orchestrator.wait_for_task("queued", 15)
    assert status["status"] == "completed"
    assert status["result"] == {"attempt": 1}


async def test_task_queued_by_the_last_orchestrator_runs_once_after_a_restart(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a task queued (and confirmed by the broker) with no agent to take it
    path = tmp_path / "state.sqlite"
    settings = FAST.model_copy(update={"lost_retry_grace": 0.2})
    first = await harness.start_orchestrator(settings, store=SQLiteStore(path))
    task_id = await first.submit_task(name="t", description="", task_type="j", payload={})

    # When the orchestrator stops (the file says it is queued, confirmed: no longer
    # in flight), and another starts on its file and runs rounds of its watch
    await first.stop()
    saved = SQLiteStore(path)
    task = await saved.get_task(task_id)
    await saved.close()
    assert (task.status, task.attempt, task.retry_due) == (TaskStatus.PENDING, 1, None)
    bus = harness.new_bus()
    await bus.connect()
    second = TaskOrchestrator(bus, settings=settings, store=SQLiteStore(path))
    rounds = _count_watch_rounds(second)
    harness.orchestrator = second
    await second.start()
    await asyncio.wait_for(rounds.after(time.time() + settings.lost_retry_grace, 2), 15)
    assert (await second.store.get_task(task_id)).attempt == 1

    # Then the queued message is the one that runs: it was not published again
    async def attempt(ctx: TaskContext) -> dict:
        return {"attempt": ctx.attempt}

    await harness.start_agent("worker", [], 1, attempt)
    status = await second.wait_for_task(task_id, 15)
    assert status["status"] == "completed"
    assert status["result"] == {"attempt": 1}


class _WatchRounds:
    """Counts the rounds of an orchestrator's watch as they end."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.changed = asyncio.Event()

    async def after(self, moment: float, count: int) -> None:
        """Until ``count`` rounds ended after ``moment``: the last ones of them
        began after it (a round begins after the previous one ended)."""
        while sum(end > moment for end in self.ends) < count:
            self.changed.clear()
            await self.changed.wait()


def _count_watch_rounds(orchestrator: TaskOrchestrator) -> _WatchRounds:
    """The end of every round of ``orchestrator``'s watch (its last step forgets
    finished tasks), before it starts."""
    rounds = _WatchRounds()
    real = orchestrator.watch.round

    async def watch_round() -> None:
        await real()
        rounds.ends.append(time.time())
        rounds.changed.set()

    orchestrator.watch.round = watch_round  # type: ignore[method-assign]
    return rounds


async def test_task_an_agent_took_while_no_orchestrator_ran_runs_once_after_a_restart(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a task queued (and confirmed) behind another one, on an agent with one slot
    path = tmp_path / "state.sqlite"
    settings = FAST.model_copy(update={"lost_retry_grace": 0.2, "heartbeat_timeout": 120})
    first = await harness.start_orchestrator(settings, store=SQLiteStore(path))
    gate = asyncio.Event()
    ran: list[tuple[str, int]] = []
    took = asyncio.Event()

    async def work(ctx: TaskContext) -> dict:
        ran.append((ctx.task_id, ctx.attempt))
        if ctx.payload.get("blocker"):
            await gate.wait()
        else:
            took.set()
        return {"attempt": ctx.attempt}

    await harness.start_agent("worker", [], 1, work)
    job = {"description": "", "task_type": "j", "max_retries": 0}
    blocker = await first.submit_task(name="blocker", payload={"blocker": True}, **job)

    async def blocker_running() -> bool:
        return (await first.get_task_status(blocker))["status"] == "running"

    await wait_until(blocker_running, timeout=15)
    task_id = await first.submit_task(name="t", payload={}, **job)
    queued_by = time.time()

    # When the orchestrator stops, the agent then takes the task and runs it (its
    # events wait in the orchestrator's events queue), and another orchestrator
    # starts on the file, its watch running rounds before it handles those events
    # (the task's queue is empty then)
    await first.stop()
    gate.set()
    await asyncio.wait_for(took.wait(), 15)
    bus = harness.new_bus()
    if not bus.is_connected:
        await bus.connect()
    second = TaskOrchestrator(bus, settings=settings, store=SQLiteStore(path))
    rounds = _count_watch_rounds(second)
    real_subscribe = bus.subscribe_events

    async def subscribe_events(handler, subscribe=None, **kwargs):
        async def after_the_rounds(event) -> None:
            await rounds.after(queued_by + settings.lost_retry_grace, 2)
            await handler(event)

        return await (subscribe or real_subscribe)(after_the_rounds, **kwargs)

    real_subscribe_agent = bus.subscribe_agent_events

    async def subscribe_agent_events(agent_id, handler, **kwargs):  # (its results: the same)
        return await subscribe_events(
            handler, subscribe=lambda h, **k: real_subscribe_agent(agent_id, h, **k), **kwargs
        )

    bus.subscribe_events = subscribe_events  # type: ignore[method-assign]
    bus.subscribe_agent_events = subscribe_agent_events  # type: ignore[method-assign]
    harness.orchestrator = second
    await second.start()

    # Then the attempt the agent took is the one that completes: it ran once,
    # it was never published again
    status = await second.wait_for_task(task_id, 15)
    assert status["status"] == "completed"
    assert status["result"] == {"attempt": 1}
    assert (await second.store.get_task(task_id)).attempt == 1
    assert [attempt for ran_id, attempt in ran if ran_id == task_id] == [1]
    assert (await second.wait_for_task(blocker, 15))["status"] == "completed"


async def test_retry_an_agent_took_while_no_orchestrator_ran_runs_once_after_a_restart(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a task whose first attempt failed on an agent with one slot, a blocker
    # queued before it failed (so the blocker takes that slot, not the retry)
    path = tmp_path / "state.sqlite"
    settings = FAST.model_copy(
        update={
            "retry_base_delay": 1.0,
            "retry_max_delay": 1.0,
            "lost_retry_grace": 5.0,
            "heartbeat_timeout": 120,
        }
    )
    first = await harness.start_orchestrator(settings, store=SQLiteStore(path))
    gate = asyncio.Event()
    ran: list[tuple[str, int]] = []
    took = asyncio.Event()
    blockers: list[str] = []

    async def work(ctx: TaskContext) -> dict:
        ran.append((ctx.task_id, ctx.attempt))
        if ctx.payload.get("blocker"):
            await gate.wait()
        elif ctx.attempt == 1:
            blockers.append(
                await first.submit_task(
                    name="blocker",
                    description="",
                    task_type="j",
                    payload={"blocker": True},
                    max_retries=0,
                )
            )
            raise RuntimeError("first attempt fails")
        else:
            took.set()
        return {"attempt": ctx.attempt}

    await harness.start_agent("worker", [], 1, work)
    task_id = await first.submit_task(name="t", description="", task_type="j", payload={})

    async def retry_waiting_behind_the_blocker() -> bool:
        status = await first.get_task_status(task_id)
        return (
            status["retry_count"] == 1
            and status["status"] == "pending"
            and bool(blockers)
            and (await first.get_task_status(blockers[0]))["status"] == "running"
        )

    await wait_until(retry_waiting_behind_the_blocker, timeout=15)

    # And the orchestrator stops while the retry (attempt 2) waits in its tier:
    # its publish was confirmed, it stays in flight (retry_due) until it starts
    await first.stop()
    saved = SQLiteStore(path)
    task = await saved.get_task(task_id)
    await saved.close()
    assert (task.status, task.attempt) == (TaskStatus.PENDING, 2)
    assert task.retry_due is not None

    # When the agent takes it and runs it (its events wait in the orchestrator's
    # events queue), and another orchestrator starts on the file, its watch
    # running rounds before it handles those events (the task's queue is empty then)
    gate.set()
    await asyncio.wait_for(took.wait(), 15)
    # (the orchestrator was down longer than the grace: the retry is long overdue)
    task.retry_due = time.time() - 60
    await _write(path, task)
    bus = await harness.connected_bus()
    published: list[tuple[str, int]] = []
    real_publish = bus.publish_task

    async def publish_task(message: TaskMessage, *args, **kwargs):
        published.append((message.task_id, message.attempt))
        return await real_publish(message, *args, **kwargs)

    bus.publish_task = publish_task  # type: ignore[method-assign]
    second = TaskOrchestrator(bus, settings=settings, store=SQLiteStore(path))
    rounds = _count_watch_rounds(second)
    real_subscribe = bus.subscribe_events
    restarted = time.time()

    async def subscribe_events(handler, subscribe=None, **kwargs):
        async def after_the_rounds(event) -> None:
            await rounds.after(restarted, 2)
            await handler(event)

        return await (subscribe or real_subscribe)(after_the_rounds, **kwargs)

    real_subscribe_agent = bus.subscribe_agent_events

    async def subscribe_agent_events(agent_id, handler, **kwargs):  # (its results: the same)
        return await subscribe_events(
            handler, subscribe=lambda h, **k: real_subscribe_agent(agent_id, h, **k), **kwargs
        )

    bus.subscribe_events = subscribe_events  # type: ignore[method-assign]
    bus.subscribe_agent_events = subscribe_agent_events  # type: ignore[method-assign]
    harness.orchestrator = second
    await second.start()

    # Then the attempt the agent took is the one that completes: each attempt
    # ran once, and no third one was ever published
    status = await second.wait_for_task(task_id, 15)
    assert status["status"] == "completed"
    assert status["result"] == {"attempt": 2}
    assert status["retry_count"] == 1
    assert (await second.store.get_task(task_id)).attempt == 2
    assert [attempt for ran_id, attempt in ran if ran_id == task_id] == [1, 2]
    assert published == []
    assert (await second.wait_for_task(blockers[0], 15))["status"] == "completed"


async def test_task_started_while_the_watch_looks_at_its_queue_is_not_published_again(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a queued task, overdue, whose message waits in its queue
    path = tmp_path / "state.sqlite"
    await _queued_in_its_queue(harness, path)
    settings = FAST.model_copy(update={"lost_retry_grace": 0.2})
    orchestrator = await harness.start_orchestrator(settings, store=SQLiteStore(path))
    gate = asyncio.Event()

    async def held(ctx: TaskContext) -> dict:
        await gate.wait()
        return {"attempt": ctx.attempt}

    async def running() -> bool:
        return (await orchestrator.get_task_status("queued"))["status"] == "running"

    # When, while the watch waits for the depth of its queue, an agent takes the
    # message and the orchestrator hears it started (the queue is empty then)
    bus = orchestrator.bus
    real = bus.queue_depth
    answered = asyncio.Event()

    async def queue_depth(queue_key: str) -> int:
        if not answered.is_set():
            await harness.start_agent("worker", [], 1, held)
            await wait_until(running, timeout=15)
        depth = await real(queue_key)
        answered.set()
        return depth

    bus.queue_depth = queue_depth  # type: ignore[method-assign]
    await asyncio.wait_for(answered.wait(), 15)

    # Then the attempt that started is not published again: it runs to the end
    gate.set()
    status = await orchestrator.wait_for_task("queued", 15)
    assert status["status"] == "completed"
    assert status["result"] == {"attempt": 1}
    assert (await orchestrator.store.get_task("queued")).attempt == 1


class _LookupFailsOnce:
    """Makes the next look-up of task ``fail_for`` in ``orchestrator``'s records fail."""

    def __init__(self, orchestrator: TaskOrchestrator, fail_for: str) -> None:
        self.fail_for: str | None = fail_for
        real = orchestrator.records.get

        def get(task_id: str | None) -> Task | None:
            if task_id == self.fail_for:
                self.fail_for = None
                raise OSError("lookup failure (injected)")
            return real(task_id)

        orchestrator.records.get = get  # type: ignore[method-assign]


async def test_a_failure_in_a_round_of_the_watch_loses_no_queued_task(
    harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given two tasks saved as queued but never published, both overdue, and
    # records whose look-up fails when the watch reads the first of them
    path = tmp_path / "state.sqlite"
    now = time.time()
    await _write(
        path,
        _task("a", TaskStatus.PENDING, attempt=1, retry_due=now - 60),
        _task("b", TaskStatus.PENDING, attempt=1, retry_due=now - 30),
    )
    caplog.set_level(logging.INFO, logger="orchestrator")
    settings = FAST.model_copy(update={"lost_retry_grace": 0.2})
    orchestrator = await harness.start_orchestrator(settings, store=SQLiteStore(path))
    lookup = _LookupFailsOnce(orchestrator, "a")

    # When the watch's round fails on the first
    async def attempt(ctx: TaskContext) -> dict:
        return {"attempt": ctx.attempt}

    await harness.start_agent("worker", [], 2, attempt)

    async def failed() -> bool:  # only the watch reads them (nobody else may before)
        return lookup.fail_for is None

    await wait_until(failed, timeout=15)
    assert any("watch of task a (attempt 1) failed" in r.getMessage() for r in caplog.records), (
        "the injected failure did not hit the watch"
    )

    # Then both are still published, and run
    for task_id in ("a", "b"):
        status = await orchestrator.wait_for_task(task_id, 15)
        assert status["status"] == "completed"
        assert status["result"] == {"attempt": 2}


# ------------------------------------------- run deadlines (rebuilt by a restart's reload)


def test_run_deadlines_expire_earliest_first_and_forget_what_expired() -> None:
    deadlines = RunDeadlines()
    deadlines.start("c", 1, 30.0)
    deadlines.start("a", 1, 10.0)
    deadlines.start("b", 2, 20.0)
    assert deadlines.expired(9.9) == []
    assert deadlines.expired(20.0) == [("a", 1), ("b", 2)]  # at the deadline counts
    assert deadlines.expired(25.0) == []  # forgotten once returned
    assert deadlines.expired(100.0) == [("c", 1)]
    assert len(deadlines) == 0


def test_run_deadlines_replace_and_discard() -> None:
    deadlines = RunDeadlines()
    deadlines.start("a", 1, 10.0)
    deadlines.start("b", 1, 20.0)
    deadlines.start("a", 2, 30.0)  # a new attempt replaces the old deadline
    deadlines.start("c", 1, 5.0)
    deadlines.start("c", 1, 1.0)  # an earlier deadline replaces a later one too
    deadlines.discard("b")
    deadlines.discard("nobody")
    assert "a" in deadlines and "b" not in deadlines
    assert deadlines.expired(25.0) == [("c", 1)]
    assert deadlines.expired(30.0) == [("a", 2)]
    deadlines.start("b", 3, 40.0)  # watched again after a discard
    assert deadlines.expired(50.0) == [("b", 3)]


def test_run_deadlines_postpone_moves_every_deadline_and_keeps_their_order() -> None:
    deadlines = RunDeadlines()
    deadlines.start("a", 1, 10.0)
    deadlines.start("b", 1, 12.0)
    deadlines.start("a", 2, 11.0)  # a stale entry for "a" stays behind
    deadlines.discard("b")
    deadlines.start("c", 1, 13.0)
    deadlines.postpone(5.0)
    assert deadlines.expired(15.9) == []
    assert deadlines.expired(16.0) == [("a", 2)]
    deadlines.start("d", 1, 17.0)  # after postponing: not moved
    assert deadlines.expired(18.0) == [("d", 1), ("c", 1)]
    assert deadlines.expired(1e9) == []


def test_run_deadlines_keep_memory_bounded_by_the_live_ones() -> None:
    # Many tasks watched and discarded long before their deadline (they finished),
    # beside as many live ones watched without any churn
    ids = [f"t{i}" for i in range(10_000)]  # (made first: not counted below)

    def held(make: Callable[[], RunDeadlines]) -> tuple[RunDeadlines, int]:
        """What ``make`` leaves allocated by orchestrator/timeouts.py, in bytes
        (by tracemalloc, so that other threads' allocations do not count)."""
        tracemalloc.start()
        try:
            made = make()
            snapshot = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        mine = snapshot.filter_traces([tracemalloc.Filter(True, timeouts_module.__file__)])
        return made, sum(stat.size for stat in mine.statistics("filename"))

    def quietly() -> RunDeadlines:
        quiet = RunDeadlines()
        for i in range(0, 10_000, 100):
            quiet.start(ids[i], 1, 1000.0 + i)
        return quiet

    def churned() -> RunDeadlines:
        deadlines = RunDeadlines()
        for i in range(10_000):
            deadlines.start(ids[i], 1, 1000.0 + i)
            if i % 100:
                deadlines.discard(ids[i])
        return deadlines

    _, quiet_size = held(quietly)
    deadlines, churned_size = held(churned)
    # Then the memory kept is of the order of the live ones' (not of the 9,900 gone:
    # about a hundred times the quiet twin's without the compaction)
    assert len(deadlines) == 100
    assert churned_size < 10 * quiet_size, (churned_size, quiet_size)
    assert deadlines.expired(1e9) == [(f"t{i}", 1) for i in range(0, 10_000, 100)]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["start", "discard", "expire", "postpone"]),
            st.integers(0, 5),
            st.integers(0, 100),
        ),
        max_size=80,
    )
)
def test_run_deadlines_agree_with_a_plain_dictionary(ops: list[tuple[str, int, int]]) -> None:
    deadlines, model = RunDeadlines(), {}
    for attempt, (op, task, number) in enumerate(ops):
        task_id = f"t{task}"
        if op == "start":
            deadlines.start(task_id, attempt, float(number))
            model[task_id] = (float(number), attempt)
        elif op == "discard":
            deadlines.discard(task_id)
            model.pop(task_id, None)
        elif op == "postpone":
            deadlines.postpone(number / 10)
            model = {t: (d + number / 10, a) for t, (d, a) in model.items()}
        else:
            late = sorted((d, t, a) for t, (d, a) in model.items() if d <= number)
            got = deadlines.expired(float(number))
            assert sorted(got) == sorted((t, a) for _, t, a in late)
            # earliest first
            assert [model[t][0] for t, _ in got] == sorted(model[t][0] for t, _ in got)
            for _, t, _ in late:
                del model[t]
        assert len(deadlines) == len(model)


# ------------------------------ agents announcing again (as every orchestrator start asks)


async def test_a_new_agent_or_process_hears_the_tasks_cancelled_in_their_queue(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given tasks cancelled while their messages waited in a queue, and an
    # orchestrator that sends their ids two per CancelTasks message
    monkeypatch.setattr(agent_registry, "CANCELLED_PER_MESSAGE", 2)
    # (heard once it announces: no heartbeat is missed while this test runs)
    orchestrator = await harness.start_orchestrator(
        FAST.model_copy(update={"heartbeat_timeout": 120})
    )
    cancelled = []
    for _ in range(5):
        task_id = await orchestrator.submit_task(
            name="t",
            description="",
            task_type="j",
            payload={},
            required_capabilities=["nobody_has_this"],
        )
        assert await orchestrator.cancel_task(task_id)
        cancelled.append(task_id)

    # And an agent's control queue, watched
    bus = harness.new_bus()
    if not bus.is_connected:
        await bus.connect()
    heard: list[Control] = []
    consume_orders = asyncio.Queue()

    async def on_control(command: Control) -> None:
        heard.append(command)
        if isinstance(command, ConsumeQueues):
            consume_orders.put_nowait(command)

    watch = await bus.subscribe_control("watcher", on_control)

    def replayed() -> list[str]:
        # In CancelTasks messages (a chunk of ids each), never one CancelTask per id
        assert not any(isinstance(c, CancelTask) for c in heard)
        return [
            task_id
            for c in heard
            if isinstance(c, CancelTasks) and c.attempt is None
            for task_id in c.task_ids
        ]

    def chunks() -> list[int]:
        return [len(c.task_ids) for c in heard if isinstance(c, CancelTasks)]

    async def register() -> None:
        # Its queues are sent last, after any cancelled ids: the registration is handled
        await orchestrator.register_agent("watcher", ["io"], 2)
        await asyncio.wait_for(consume_orders.get(), 15)

    async def announce() -> None:
        # As an agent process does when it starts (the events carry nothing else)
        await bus.publish_event(
            AgentAnnounced(agent_id="watcher", capabilities=["io"], max_concurrent_tasks=2)
        )
        await asyncio.wait_for(consume_orders.get(), 15)

    try:
        # When it registers: it hears every cancelled id before its queues
        await register()
        assert replayed() == cancelled
        assert chunks() == [2, 2, 1]

        # When it is registered again through the API: not again
        await register()
        await register()
        assert replayed() == cancelled

        # When it announces itself (a process restarted under the same id, before its
        # heartbeats were missed, knows nothing of what it heard): again
        await announce()
        assert replayed() == cancelled * 2

        # When it was removed and comes back: it is new again
        await orchestrator.unregister_agent("watcher")
        await register()
        assert replayed() == cancelled * 3
        assert chunks() == [2, 2, 1] * 3
    finally:
        await watch.close()


async def test_an_agent_announcing_while_a_new_queue_is_announced_hears_of_it(
    harness: Harness,
) -> None:
    # Given two agents that cover a capability no task needed yet, their control
    # queues watched: "early" is told of a new queue before "late"
    orchestrator = await harness.start_orchestrator(
        FAST.model_copy(update={"heartbeat_timeout": 120})
    )
    bus = harness.new_bus()
    if not bus.is_connected:
        await bus.connect()
    orders: dict[str, list[list[str]]] = {"early": [], "late": []}
    watches = []
    for agent_id in orders:

        async def on_control(command: Control, agent_id: str = agent_id) -> None:
            if isinstance(command, ConsumeQueues):
                orders[agent_id].append(command.queue_keys)

        watches.append(await bus.subscribe_control(agent_id, on_control))
        await bus.publish_event(
            AgentAnnounced(
                agent_id=agent_id, capabilities=["stage2"], max_concurrent_tasks=1, task_types=["j"]
            )
        )

    async def both_registered() -> bool:
        return len(await orchestrator.get_agents()) == 2 and all(orders.values())

    await wait_until(both_registered, timeout=15)
    key = route_key("j", ["stage2"])

    # When a task needs that queue, and "early" (a process restarted under its id,
    # knowing nothing) announces itself after it was told, while "late" is told
    real = orchestrator.bus.publish_control
    announced = asyncio.Event()

    async def publish_control(command: Control, *, agent_id: str | None = None) -> None:
        if (
            isinstance(command, ConsumeQueues)
            and agent_id == "late"
            and key in command.queue_keys
            and not announced.is_set()
        ):
            announced.set()
            heard = len(orders["early"])
            await bus.publish_event(
                AgentAnnounced(
                    agent_id="early",
                    capabilities=["stage2"],
                    max_concurrent_tasks=1,
                    task_types=["j"],
                )
            )

            async def answered() -> bool:
                return len(orders["early"]) > heard

            await wait_until(answered, timeout=15)
        await real(command, agent_id=agent_id)

    orchestrator.bus.publish_control = publish_control  # type: ignore[method-assign]
    try:
        await orchestrator.submit_task(
            name="t", description="", task_type="j", payload={}, required_capabilities=["stage2"]
        )

        # Then what it was told on announcing includes the new queue
        assert announced.is_set()

        async def late_told() -> bool:
            return any(key in keys for keys in orders["late"])

        await wait_until(late_told, timeout=15)
        assert key in orders["early"][-1], orders["early"]
    finally:
        orchestrator.bus.publish_control = real  # type: ignore[method-assign]
        for watch in watches:
            await watch.close()
