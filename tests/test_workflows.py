"""Workflows and failure recovery: dependencies, retries, timeouts, cancellation,
dead letters. Every rule on both buses."""

from __future__ import annotations

import asyncio
import itertools
import json

import aio_pika

from agents import TaskContext
from broker import MemoryBus, Topology
from broker.topology import RETRY_TIERS_MS
from orchestrator import RetryPolicy, TaskPriority
from tests.harness import FAST, Harness, wait_all, wait_until


def job(**kwargs):
    """submit_task arguments with defaults for the fields a test does not care about."""
    kwargs.setdefault("name", "job")
    kwargs.setdefault("description", "")
    kwargs.setdefault("task_type", "job")
    kwargs.setdefault("payload", {})
    return kwargs


# --------------------------------------------------------------------- dependencies


async def test_seed_complex_workflow_passes_results_along(harness: Harness) -> None:
    # Given agents for analysis, risk and trading that read their dependencies' results
    orchestrator = await harness.start_orchestrator()

    async def analysis(ctx: TaskContext) -> dict:
        return {"symbol": ctx.payload["symbols"][0], "rsi": 31.5}

    async def risk(ctx: TaskContext) -> dict:
        upstream = ctx.dependency_results[ctx.payload["analysis_task_id"]]
        return {"symbol": upstream["symbol"], "size": 0.02 if upstream["rsi"] < 70 else 0}

    async def trading(ctx: TaskContext) -> dict:
        upstream = ctx.dependency_results[ctx.payload["risk_task_id"]]
        return {"bought": upstream["symbol"], "size": upstream["size"]}

    agent = await harness.start_agent("analysis_agent", [], 3, analysis, task_type="analysis")
    agent.add_handler("risk_analysis", risk)
    agent.add_handler("trading", trading)

    # When the seed's workflow is submitted, as the seed writes it
    analysis_task = await orchestrator.submit_task(
        name="Market Analysis",
        description="Comprehensive market analysis",
        task_type="analysis",
        payload={"symbols": ["BTC"], "indicators": ["rsi", "macd", "volume"]},
        priority=TaskPriority.HIGH,
    )
    risk_task = await orchestrator.submit_task(
        name="Risk Assessment",
        description="Evaluate trading risks",
        task_type="risk_analysis",
        payload={"analysis_task_id": analysis_task},
        dependencies=[analysis_task],
        priority=TaskPriority.CRITICAL,
    )
    trade_task = await orchestrator.submit_task(
        name="Execute Trade",
        description="Execute trading decision",
        task_type="trading",
        payload={"risk_task_id": risk_task},
        dependencies=[risk_task],
        priority=TaskPriority.CRITICAL,
    )

    # Then each step read the previous one's result
    statuses = await wait_all(orchestrator, [analysis_task, risk_task, trade_task])
    assert [s["status"] for s in statuses] == ["completed"] * 3
    assert statuses[1]["result"] == {"symbol": "BTC", "size": 0.02}
    assert statuses[2]["result"] == {"bought": "BTC", "size": 0.02}
    assert statuses[0]["started_at"] < statuses[1]["started_at"] < statuses[2]["started_at"]


async def test_dependent_waits_pending_until_dependency_completes(harness: Harness) -> None:
    orchestrator = await harness.start_orchestrator()
    gate = asyncio.Event()

    async def handler(ctx: TaskContext) -> dict:
        if ctx.payload.get("block"):
            await gate.wait()
        return {}

    await harness.start_agent("worker", [], 4, handler)
    first = await orchestrator.submit_task(**job(payload={"block": True}))
    second = await orchestrator.submit_task(**job(dependencies=[first]))
    await asyncio.sleep(0.2)
    assert (await orchestrator.get_task_status(second))["status"] == "pending"
    gate.set()
    assert (await orchestrator.wait_for_task(second, timeout=10))["status"] == "completed"


async def test_failed_dependency_fails_two_levels_of_dependents(harness: Harness) -> None:
    # Given a chain a <- b <- c and a sibling d <- a, where a always fails
    orchestrator = await harness.start_orchestrator()
    ran: list[str] = []

    async def handler(ctx: TaskContext) -> dict:
        ran.append(ctx.name)
        if ctx.name == "a":
            raise RuntimeError("a is broken")
        return {}

    await harness.start_agent("worker", [], 2, handler)
    a = await orchestrator.submit_task(**job(name="a", max_retries=0))
    b = await orchestrator.submit_task(**job(name="b", dependencies=[a]))
    c = await orchestrator.submit_task(**job(name="c", dependencies=[b]))
    d = await orchestrator.submit_task(**job(name="d", dependencies=[a]))

    # Then all of them end failed, each naming the dependency that failed it
    sa, sb, sc, sd = await wait_all(orchestrator, [a, b, c, d])
    assert sa["status"] == "failed" and sa["error_message"] == "RuntimeError: a is broken"
    assert sb["status"] == sc["status"] == sd["status"] == "failed"
    assert a in sb["error_message"] and "failed" in sb["error_message"]
    assert b in sc["error_message"]
    assert a in sd["error_message"]
    assert ran == ["a"]
    stats = await orchestrator.get_stats()
    assert stats["tasks_failed"] == 4 and stats["pending_tasks"] == 0
    # A task submitted on an already failed dependency fails at once
    late = await orchestrator.submit_task(**job(name="late", dependencies=[c]))
    assert (await orchestrator.get_task_status(late))["status"] == "failed"


# --------------------------------------------------------------------- retries


def test_retry_delays_grow_exponentially_with_bounded_jitter() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=30.0)
    for n in range(1, 8):
        delays = [policy.delay(n) for _ in range(50)]
        floor = min(30.0, 2 ** (n - 1))
        assert all(floor <= d <= min(30.0, floor + 1.0) for d in delays), (n, delays[:3])
        if floor < 29:
            assert len(set(delays)) > 1  # jittered


async def test_flaky_handler_succeeds_on_third_attempt_with_growing_back_off(
    harness: Harness,
) -> None:
    # Given a handler that fails its first two attempts, and a 0.2 s base back-off
    settings = FAST.model_copy(update={"retry_base_delay": 0.2, "retry_max_delay": 5})
    orchestrator = await harness.start_orchestrator(settings)
    loop = asyncio.get_running_loop()
    attempts: list[tuple[int, float]] = []

    async def flaky(ctx: TaskContext) -> dict:
        attempts.append((ctx.attempt, loop.time()))
        if len(attempts) < 4:
            raise ConnectionError(f"flaky #{len(attempts)}")
        return {"after": len(attempts)}

    await harness.start_agent("worker", [], 2, flaky)

    # When it runs with three retries allowed
    task_id = await orchestrator.submit_task(**job(max_retries=3))
    status = await orchestrator.wait_for_task(task_id, timeout=20)

    # Then it completes on the fourth attempt, and the waits grew
    assert status["status"] == "completed"
    assert status["retry_count"] == 3
    assert status["result"] == {"after": 4}
    assert [a for a, _ in attempts] == [1, 2, 3, 4]
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8, gaps
    assert gaps[0] < gaps[2], gaps


async def test_flaky_handler_succeeds_on_attempt_three(harness: Harness) -> None:
    orchestrator = await harness.start_orchestrator()
    calls = 0

    async def flaky(ctx: TaskContext) -> dict:
        nonlocal calls
        calls += 1
        if ctx.attempt < 3:
            raise ValueError("not yet")
        return {"attempt": ctx.attempt}

    await harness.start_agent("worker", [], 2, flaky)
    status = await orchestrator.wait_for_task(await orchestrator.submit_task(**job()), 20)
    assert status["status"] == "completed"
    assert status["result"] == {"attempt": 3}
    assert status["retry_count"] == 2 and calls == 3


async def test_always_failing_handler_fails_after_max_retries(harness: Harness) -> None:
    orchestrator = await harness.start_orchestrator()
    calls = 0

    async def broken(ctx: TaskContext) -> dict:
        nonlocal calls
        calls += 1
        raise RuntimeError(f"broken on attempt {ctx.attempt}")

    await harness.start_agent("worker", [], 2, broken)
    task_id = await orchestrator.submit_task(**job(max_retries=2))
    status = await orchestrator.wait_for_task(task_id, 20)
    assert status["status"] == "failed"
    assert status["retry_count"] == 2
    assert status["error_message"] == "RuntimeError: broken on attempt 3"
    assert calls == 3
    assert (await orchestrator.get_stats())["tasks_failed"] == 1


async def lose_delayed_retries(harness: Harness) -> None:
    """What DESIGN.md warns of: the broker drops a dead-lettered retry."""
    if harness.bus_kind == "memory":
        bus = harness.new_bus()
        assert isinstance(bus, MemoryBus)
        for timer in list(bus._timers):
            timer.cancel()
        bus._timers.clear()
        return
    topology = Topology(harness.settings.prefix)
    connection = await aio_pika.connect(harness.settings.broker_url)
    try:
        for tier in RETRY_TIERS_MS:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(topology.retry_queue(tier), passive=True)
            except aio_pika.exceptions.ChannelClosed:
                continue  # that tier was never used
            await queue.purge()
            await channel.close()
    finally:
        await connection.close()


async def test_a_lost_retry_is_published_again(harness: Harness) -> None:
    # Given a task whose retry waits three seconds in a TTL queue
    settings = FAST.model_copy(
        update={"retry_base_delay": 3.0, "retry_max_delay": 3.0, "lost_retry_grace": 0.5}
    )
    orchestrator = await harness.start_orchestrator(settings)
    attempts: list[int] = []

    async def fails_first(ctx: TaskContext) -> dict:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return {"attempt": ctx.attempt}

    await harness.start_agent("worker", [], 2, fails_first)
    task_id = await orchestrator.submit_task(**job())

    async def retry_waiting() -> bool:
        status = await orchestrator.get_task_status(task_id)
        return status["retry_count"] == 1 and status["status"] == "assigned"

    await wait_until(retry_waiting, timeout=10)

    # When the broker loses it
    await lose_delayed_retries(harness)

    # Then the orchestrator notices it overdue, publishes it again, and it completes
    status = await orchestrator.wait_for_task(task_id, timeout=20)
    assert status["status"] == "completed"
    assert status["result"] == {"attempt": 3}  # attempt 2 was the lost one
    assert attempts == [1, 3]


async def test_retry_prefers_another_agent(harness: Harness) -> None:
    # Given two capable agents, and tasks that fail on their first attempt
    orchestrator = await harness.start_orchestrator()
    runs: dict[str, list[str]] = {}

    async def fails_first_time(ctx: TaskContext) -> dict:
        runs.setdefault(ctx.task_id, []).append(ctx.agent_id)
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return {}

    await harness.start_agent("one", ["x"], 4, fails_first_time)
    await harness.start_agent("two", ["x"], 4, fails_first_time)

    # When they are retried
    ids = [await orchestrator.submit_task(**job(required_capabilities=["x"])) for _ in range(4)]
    statuses = await wait_all(orchestrator, ids, timeout=30)

    # Then each retry ran on the agent the first attempt did not run on
    assert all(s["status"] == "completed" and s["retry_count"] == 1 for s in statuses)
    for task_id in ids:
        first, second = runs[task_id]
        assert first != second, runs


async def test_retry_stays_when_no_other_agent_can_run_it(harness: Harness) -> None:
    orchestrator = await harness.start_orchestrator()

    async def fails_first_time(ctx: TaskContext) -> dict:
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return {"agent": ctx.agent_id}

    await harness.start_agent("only", ["x"], 2, fails_first_time)
    await harness.start_agent("other", ["y"], 2, fails_first_time)
    status = await orchestrator.wait_for_task(
        await orchestrator.submit_task(**job(required_capabilities=["x"])), 20
    )
    assert status["status"] == "completed" and status["result"] == {"agent": "only"}


# --------------------------------------------------------------------- timeouts


async def test_handler_past_its_timeout_ends_timeout(harness: Harness) -> None:
    orchestrator = await harness.start_orchestrator()
    cancelled = 0

    async def sleepy(ctx: TaskContext) -> dict:
        nonlocal cancelled
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return {}

    await harness.start_agent("worker", [], 2, sleepy)
    task_id = await orchestrator.submit_task(**job(timeout=0.3, max_retries=1))
    status = await orchestrator.wait_for_task(task_id, 20)
    assert status["status"] == "timeout"
    assert status["error_message"] == "exceeded timeout of 0.3s"
    assert status["retry_count"] == 1
    assert cancelled == 2
    assert (await orchestrator.get_stats())["tasks_failed"] == 1


async def test_silent_agent_is_timed_out_by_the_orchestrator(harness: Harness) -> None:
    # Given an agent whose handler ignores cancellation, so it never reports
    orchestrator = await harness.start_orchestrator()
    release = asyncio.Event()

    async def stubborn(ctx: TaskContext) -> dict:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue
        return {"late": True}

    await harness.start_agent("stubborn", [], 1, stubborn)

    # When its task passes timeout + grace
    task_id = await orchestrator.submit_task(**job(timeout=0.3, max_retries=0))
    status = await orchestrator.wait_for_task(task_id, 20)

    # Then the orchestrator ends it as timeout, and ignores the late result
    assert status["status"] == "timeout"
    assert "no result from agent stubborn" in status["error_message"]
    release.set()
    await asyncio.sleep(0.3)
    status = await orchestrator.get_task_status(task_id)
    assert status["status"] == "timeout" and status["result"] is None


# --------------------------------------------------------------------- cancellation


async def test_cancel_waiting_task_and_its_dependents(harness: Harness) -> None:
    orchestrator = await harness.start_orchestrator()
    gate = asyncio.Event()
    ran: list[str] = []

    async def handler(ctx: TaskContext) -> dict:
        ran.append(ctx.name)
        if ctx.name == "first":
            await gate.wait()
        return {}

    await harness.start_agent("worker", [], 2, handler)
    first = await orchestrator.submit_task(**job(name="first"))
    waiting = await orchestrator.submit_task(**job(name="waiting", dependencies=[first]))
    after = await orchestrator.submit_task(**job(name="after", dependencies=[waiting]))

    assert await orchestrator.cancel_task(waiting) is True
    gate.set()
    s_first, s_waiting, s_after = await wait_all(orchestrator, [first, waiting, after])
    assert s_first["status"] == "completed"
    assert s_waiting["status"] == "cancelled"
    assert s_after["status"] == "cancelled" and waiting in s_after["error_message"]
    assert ran == ["first"]
    assert await orchestrator.cancel_task(waiting) is False  # already final
    assert await orchestrator.cancel_task(first) is False
    assert await orchestrator.cancel_task("task_unknown") is False


async def test_cancel_queued_task_never_runs(harness: Harness) -> None:
    # Given a task queued for a capability no agent has yet
    orchestrator = await harness.start_orchestrator()
    ran: list[str] = []

    async def handler(ctx: TaskContext) -> dict:
        ran.append(ctx.name)
        return {}

    queued = await orchestrator.submit_task(**job(name="queued", required_capabilities=["rare"]))
    assert (await orchestrator.get_task_status(queued))["status"] == "assigned"

    # When it is cancelled, and only then an agent with that capability comes
    assert await orchestrator.cancel_task(queued) is True
    await harness.start_agent("rare_agent", ["rare"], 2, handler)
    later = await orchestrator.submit_task(**job(name="later", required_capabilities=["rare"]))

    # Then the later task runs and the cancelled one never does
    assert (await orchestrator.wait_for_task(later, 10))["status"] == "completed"
    assert (await orchestrator.get_task_status(queued))["status"] == "cancelled"
    assert ran == ["later"]


async def test_cancel_running_task_stops_its_handler(harness: Harness) -> None:
    orchestrator = await harness.start_orchestrator()
    started = asyncio.Event()
    stopped = asyncio.Event()

    async def long(ctx: TaskContext) -> dict:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return {}

    agent = await harness.start_agent("worker", [], 1, long)
    task_id = await orchestrator.submit_task(**job())
    await asyncio.wait_for(started.wait(), 10)
    await wait_until(lambda: _status_is(orchestrator, task_id, "running"))

    assert await orchestrator.cancel_task(task_id) is True
    await asyncio.wait_for(stopped.wait(), 10)
    assert (await orchestrator.get_task_status(task_id))["status"] == "cancelled"
    await wait_until(lambda: _agent_idle(orchestrator, "worker"))
    assert agent.counters.cancelled == 1
    # the freed slot takes new work
    assert (
        await orchestrator.wait_for_task(
            await orchestrator.submit_task(**job(payload={"x": 1}, timeout=0.5, max_retries=0)), 10
        )
    )["status"] in ("timeout", "completed")


async def _status_is(orchestrator, task_id: str, status: str) -> bool:
    return (await orchestrator.get_task_status(task_id))["status"] == status


async def _agent_idle(orchestrator, agent_id: str) -> bool:
    return (await orchestrator.get_stats())["agent_utilization"].get(agent_id) == 0.0


# --------------------------------------------------------------------- dead letters


async def test_malformed_task_message_is_dead_lettered_and_fails_its_task(
    harness: Harness,
) -> None:
    # Given a queued task, and an agent consuming the queue of another capability
    orchestrator = await harness.start_orchestrator()
    await harness.start_agent("reader", ["reads"], 2)
    task_id = await orchestrator.submit_task(**job(required_capabilities=["nobody_has_this"]))
    await orchestrator.submit_task(**job(required_capabilities=["reads"]))  # declares its queue

    # When a malformed message for that task reaches the agent
    body = json.dumps({"v": 1, "kind": "task", "task_id": task_id, "attempt": 1}).encode()
    await _inject(harness, "reads", body, f"{task_id}:1")

    # Then the task fails with the reason, and the dead-letter queue has it
    status = await orchestrator.wait_for_task(task_id, 15)
    assert status["status"] == "failed"
    assert "invalid message" in status["error_message"]
    assert "name" in status["error_message"]  # the first missing field
    reason = await _dead_letter_reason(harness)
    assert reason is not None and "invalid message" in reason and "reader" in reason


async def _inject(harness: Harness, key: str, body: bytes, message_id: str) -> None:
    """Put raw bytes on a task queue, as a broken publisher would."""
    bus = harness.orchestrator.bus
    if isinstance(bus, MemoryBus):
        queue = bus._queue(key)
        queue.push(1, body, message_id)
        bus._dispatch(queue)
        return
    connection = await aio_pika.connect(harness.settings.broker_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(bus.topology.tasks_exchange)
        await exchange.publish(aio_pika.Message(body, message_id=message_id), routing_key=key)


async def _dead_letter_reason(harness: Harness) -> str | None:
    bus = harness.orchestrator.bus
    if isinstance(bus, MemoryBus):
        return bus.dead_letters[-1].reason if bus.dead_letters else None
    connection = await aio_pika.connect(harness.settings.broker_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(bus.topology.dead_queue, ensure=False)
        message = await queue.get(fail=False, timeout=5)
        if message is None:
            return None
        await message.ack()
        return str(message.headers.get("x-reason"))
