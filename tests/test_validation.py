"""Bad input: a ValueError naming the field, and no trace left behind."""

from __future__ import annotations

from typing import Any

import pytest

from broker import RabbitMQBus
from orchestrator import OrchestratorSettings, TaskOrchestrator, TaskPriority
from tests.harness import Harness

GOOD: dict[str, Any] = {
    "name": "BTC Analysis",
    "description": "Analyze BTC price action and sentiment",
    "task_type": "analysis",
    "payload": {"symbol": "BTC"},
}

BAD_SUBMITS = [
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": None}, "name"),
    ({"task_type": ""}, "task_type"),
    ({"priority": "urgent"}, "priority"),
    ({"priority": 3}, "priority"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": -5}, "timeout"),
    ({"timeout": "600"}, "timeout"),
    ({"timeout": float("inf")}, "timeout"),
    ({"estimated_duration": 0}, "estimated_duration"),
    ({"estimated_duration": -1}, "estimated_duration"),
    ({"required_capabilities": ["fine", "not fine!"]}, "required_capabilities"),
    ({"required_capabilities": ["a.b"]}, "required_capabilities"),
    ({"required_capabilities": ["x" * 65]}, "required_capabilities"),
    ({"payload": {"when": object()}}, "payload"),
    ({"payload": {"nan": float("nan")}}, "payload"),
    ({"payload": "not a dict"}, "payload"),
    ({"payload": {"big": "x" * 2000}}, "payload"),
    ({"dependencies": ["task_does_not_exist"]}, "dependencies"),
    ({"max_retries": -1}, "max_retries"),
]


@pytest.mark.parametrize(("change", "field"), BAD_SUBMITS, ids=[f for _, f in BAD_SUBMITS])
async def test_bad_submit_names_the_field(harness: Harness, change: dict, field: str) -> None:
    # Given an orchestrator with a 1 KiB payload limit and one accepted task
    orchestrator = await harness.start_orchestrator(OrchestratorSettings(max_payload_bytes=1024))
    accepted = await orchestrator.submit_task(**GOOD)
    before = await orchestrator.get_stats()

    # When a bad submit is made, Then a ValueError names the field
    with pytest.raises(ValueError) as error:
        await orchestrator.submit_task(**{**GOOD, **change})
    assert str(error.value).startswith(field), str(error.value)

    # And the stats are as before, and the accepted task is still there
    assert await orchestrator.get_stats() == before
    assert (await orchestrator.get_task_status(accepted))["name"] == "BTC Analysis"


@pytest.mark.parametrize("bus_kind", ["memory"], indirect=True)
async def test_priority_accepts_enum_and_value(harness: Harness) -> None:
    orchestrator = await harness.start_orchestrator()
    for priority in (TaskPriority.CRITICAL, "critical", "CRITICAL"):
        task_id = await orchestrator.submit_task(**GOOD, priority=priority)
        assert (await orchestrator.get_task_status(task_id))["priority"] == "critical"


@pytest.mark.parametrize("bus_kind", ["memory"], indirect=True)
async def test_bad_agent_registration_names_the_field(harness: Harness) -> None:
    orchestrator = await harness.start_orchestrator()
    for kwargs, field in [
        ({"agent_id": "has space", "capabilities": ["a"]}, "agent_id"),
        ({"agent_id": "ok", "capabilities": "trading"}, "capabilities"),
        ({"agent_id": "ok", "capabilities": ["bad cap"]}, "capabilities"),
        (
            {"agent_id": "ok", "capabilities": ["a"], "max_concurrent_tasks": 0},
            "max_concurrent_tasks",
        ),
    ]:
        with pytest.raises(ValueError, match=f"^{field}"):
            await orchestrator.register_agent(**kwargs)
    assert (await orchestrator.get_stats())["registered_agents"] == 0


async def test_unreachable_broker_is_a_connection_error_without_password() -> None:
    # Given a bus pointing at a port where no broker listens
    bus = RabbitMQBus("amqp://guest:s3cret-pw@127.0.0.1:1/")
    bus.settings = bus.settings.model_copy(update={"connect_attempts": 1, "connect_timeout": 2})
    orchestrator = TaskOrchestrator(bus)

    # When the orchestrator starts, Then it raises ConnectionError with the address only
    with pytest.raises(ConnectionError) as error:
        await orchestrator.start()
    assert "127.0.0.1:1" in str(error.value)
    assert "s3cret-pw" not in str(error.value)


@pytest.mark.parametrize("bus_kind", ["memory"], indirect=True)
async def test_use_before_start_is_a_connection_error(harness: Harness) -> None:
    orchestrator = TaskOrchestrator(harness.new_bus())
    with pytest.raises(ConnectionError):
        await orchestrator.submit_task(**GOOD)
