"""The seed's usage examples, as tests, with real agents on both buses."""

from __future__ import annotations

import asyncio

import pytest

from agents import TaskContext
from orchestrator import TaskPriority
from tests.harness import Harness, wait_all


async def test_basic_task_submission(harness: Harness) -> None:
    # Given an orchestrator and an agent with both required capabilities
    orchestrator = await harness.start_orchestrator()

    async def sentiment(ctx: TaskContext) -> dict:
        ctx.progress(0.5)
        return {"sentiment": {s: 0.1 for s in ctx.payload["symbols"]}}

    await harness.start_agent(
        "sentiment_agent_1", ["sentiment_analysis", "social_media"], 2, sentiment
    )

    # When the seed's task is submitted
    task_id = await orchestrator.submit_task(
        name="Market Sentiment Analysis",
        description="Analyze current market sentiment across major cryptocurrencies",
        task_type="sentiment_analysis",
        payload={
            "symbols": ["BTC", "ETH", "SOL"],
            "sources": ["twitter", "news", "reddit"],
            "timeframe": "24h",
        },
        priority=TaskPriority.HIGH,
        required_capabilities=["sentiment_analysis", "social_media"],
        estimated_duration=600,
    )

    # Then the seed's monitoring loop sees it complete, with its result
    seen = []
    for _ in range(500):
        status = await orchestrator.get_task_status(task_id)
        assert status is not None
        seen.append(status["status"])
        if status["status"] in ["completed", "failed"]:
            break
        await asyncio.sleep(0.02)
    assert status["status"] == "completed"
    assert set(status) == {
        "task_id",
        "name",
        "status",
        "assigned_agent",
        "created_at",
        "started_at",
        "completed_at",  # a field of the seed's Task
        "priority",
        "progress",
        "result",
        "error_message",
        "retry_count",  # the workflows issue adds it to the seed's keys
        "traceback",  # the last failed attempt's, if any
    }
    assert status["task_id"] == task_id
    assert status["name"] == "Market Sentiment Analysis"
    assert status["assigned_agent"] == "sentiment_agent_1"
    assert status["priority"] == "high"
    assert status["progress"] == 1.0
    assert status["result"] == {"sentiment": {"BTC": 0.1, "ETH": 0.1, "SOL": 0.1}}
    assert status["error_message"] is None
    assert status["retry_count"] == 0
    assert status["created_at"] <= status["started_at"] <= status["completed_at"]
    assert status["traceback"] is None


async def test_agent_registration_and_load_balancing(harness: Harness) -> None:
    # Given the seed's three agents, registered through the API and running
    orchestrator = await harness.start_orchestrator()
    agents = [
        ("analysis_agent_1", ["technical_analysis", "sentiment_analysis"], 5),
        ("trading_agent_1", ["trading", "order_execution"], 3),
        ("risk_agent_1", ["risk_management", "portfolio_analysis"], 2),
    ]
    for agent_id, capabilities, max_tasks in agents:
        await orchestrator.register_agent(
            agent_id=agent_id, capabilities=capabilities, max_concurrent_tasks=max_tasks
        )
    running = {}
    for agent_id, capabilities, max_tasks in agents:
        running[agent_id] = await harness.start_agent(agent_id, capabilities, max_tasks)
    assert (await orchestrator.get_stats())["registered_agents"] == 3

    # When the seed's ten analysis tasks are submitted
    task_ids = []
    for i in range(10):
        task_ids.append(
            await orchestrator.submit_task(
                name=f"Analysis Task {i}",
                description=f"Market analysis job {i}",
                task_type="analysis",
                payload={"task_number": i},
                required_capabilities=["technical_analysis"],
            )
        )

    # Then all complete, on the one agent that can run them, never above its limit
    statuses = await wait_all(orchestrator, task_ids)
    assert [s["status"] for s in statuses] == ["completed"] * 10
    assert {s["assigned_agent"] for s in statuses} == {"analysis_agent_1"}
    assert [s["result"]["echo"]["task_number"] for s in statuses] == list(range(10))
    assert running["analysis_agent_1"].counters.max_running <= 5
    assert running["trading_agent_1"].counters.received == 0
    assert running["risk_agent_1"].counters.received == 0


@pytest.mark.rabbitmq
@pytest.mark.parametrize("bus_kind", ["rabbitmq"], indirect=True)
async def test_load_balancing_with_agent_processes(harness: Harness) -> None:
    # Given two agents, each in its own process, each running up to 3 tasks
    orchestrator = await harness.start_orchestrator()
    for agent_id in ("proc_agent_1", "proc_agent_2"):
        harness.spawn_agent(agent_id, ["technical_analysis"], AGENT_MAX=3, AGENT_SLEEP=0.05)
    await harness.wait_agents("proc_agent_1", "proc_agent_2")

    # When 30 tasks are submitted
    task_ids = [
        await orchestrator.submit_task(
            name=f"Analysis Task {i}",
            description="",
            task_type="analysis",
            payload={"task_number": i},
            required_capabilities=["technical_analysis"],
        )
        for i in range(30)
    ]

    # Then all complete, spread over both processes
    statuses = await wait_all(orchestrator, task_ids)
    assert [s["status"] for s in statuses] == ["completed"] * 30
    by_agent = {s["assigned_agent"] for s in statuses}
    assert by_agent == {"proc_agent_1", "proc_agent_2"}
    assert len({s["result"]["pid"] for s in statuses}) == 2


SEED_AGENTS = [
    ("analysis_agent_1", ["technical_analysis", "sentiment_analysis"], 5),
    ("trading_agent_1", ["trading", "order_execution"], 3),
    ("risk_agent_1", ["risk_management", "portfolio_analysis"], 2),
]
"""The seed's "Agent Registration and Load Balancing" agents, exactly."""


@pytest.mark.rabbitmq
@pytest.mark.parametrize("bus_kind", ["rabbitmq"], indirect=True)
async def test_agent_registration_and_load_balancing_with_agent_processes(
    harness: Harness,
) -> None:
    # Given the seed's three agents, each in its own process on RabbitMQ
    orchestrator = await harness.start_orchestrator()
    processes = {
        agent_id: harness.spawn_agent(agent_id, capabilities, AGENT_MAX=max_tasks, AGENT_SLEEP=0.2)
        for agent_id, capabilities, max_tasks in SEED_AGENTS
    }
    await harness.wait_agents(*processes, timeout=60)

    # And registered as the seed does (the same code path as their announcements)
    for agent_id, capabilities, max_tasks in SEED_AGENTS:
        await orchestrator.register_agent(
            agent_id=agent_id, capabilities=capabilities, max_concurrent_tasks=max_tasks
        )
    registered = {
        a.agent_id: (sorted(a.capabilities), a.max_concurrent_tasks)
        for a in await orchestrator.get_agents()
    }
    assert registered == {
        agent_id: (sorted(capabilities), max_tasks)
        for agent_id, capabilities, max_tasks in SEED_AGENTS
    }
    assert (await orchestrator.get_stats())["registered_agents"] == 3

    # When the seed's ten analysis tasks are submitted
    task_ids = []
    for i in range(10):
        task_ids.append(
            await orchestrator.submit_task(
                name=f"Analysis Task {i}",
                description=f"Market analysis job {i}",
                task_type="analysis",
                payload={"task_number": i},
                required_capabilities=["technical_analysis"],
            )
        )

    # Then every one completes on analysis_agent_1, the only agent able to,
    # in its process, which never ran more than 5 at once
    statuses = await wait_all(orchestrator, task_ids, timeout=120)
    assert [s["status"] for s in statuses] == ["completed"] * 10
    assert [s["assigned_agent"] for s in statuses] == ["analysis_agent_1"] * 10
    assert [s["result"]["echo"]["task_number"] for s in statuses] == list(range(10))
    assert {s["result"]["agent"] for s in statuses} == {"analysis_agent_1"}
    assert {s["result"]["pid"] for s in statuses} == {processes["analysis_agent_1"].pid}
    assert 1 <= max(s["result"]["max_running"] for s in statuses) <= 5
    assert all(s["error_message"] is None for s in statuses)
    stats = await orchestrator.get_stats()
    assert stats["tasks_created"] == stats["tasks_completed"] == 10
    assert stats["running_tasks"] == stats["pending_tasks"] == 0
    assert all(process.poll() is None for process in processes.values())
