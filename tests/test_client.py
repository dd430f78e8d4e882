"""``Client`` and ``SyncClient``: another service submits, waits, cancels and lists.

In process on both buses (an orchestrator answering requests, an agent, and a
client on the same bus kind), and from another process: a script using the
client against ``orchestrator serve`` and ``orchestrator agent run`` on the
real broker. A handle's ``result`` waits on its task's events: these tests
set the client's re-check (``resync_interval``) to an hour, so a result that
came only by asking again would time out.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from agents import Agent, TaskContext
from broker import MemoryBus, SubmitTaskRequest
from orchestrator import (
    Client,
    OrchestratorService,
    SyncClient,
    TaskOrchestrator,
    TaskPriority,
    TaskStatus,
)
from orchestrator import client as client_module
from tests.conftest import require_broker
from tests.deployment import ROOT, Deployment, base_env
from tests.harness import FAST, Harness, wait_until
from tests.test_permissions import AGENT_ID, Users, bus, users  # noqa: F401 - the fixture

HOUR = 3600.0


def client_of(harness: Harness) -> Client:
    """A client as another service has it: on the in-process bus, or a connection
    of its own that declares nothing."""
    if harness.bus_kind == "memory":
        return Client(bus=harness.new_bus(), resync_interval=HOUR, request_timeout=5)
    return Client(settings=harness.settings, resync_interval=HOUR, request_timeout=5)


@pytest.fixture
async def served(harness: Harness):
    """An orchestrator answering requests, with one agent whose handler waits for a gate."""
    orchestrator = await harness.start_orchestrator()
    service = OrchestratorService(orchestrator)
    await service.start()
    gates: dict[str, asyncio.Event] = {}

    async def work(ctx: TaskContext) -> dict[str, Any]:
        gate = ctx.payload.get("gate")
        if gate:
            await gates.setdefault(gate, asyncio.Event()).wait()
        if ctx.payload.get("fail"):
            raise RuntimeError(ctx.payload["fail"])
        return {"echo": ctx.payload, "agent": ctx.agent_id}

    await harness.start_agent("client_agent", ["analysis"], 4, work)
    try:
        yield harness, gates
    finally:
        await service.stop()


async def test_submit_and_result_wait_on_the_tasks_event(served) -> None:
    harness, gates = served
    async with client_of(harness) as client:
        # When a service submits a task that runs until released, and waits for it
        handle = await client.submit(
            "BTC analysis", "", "analysis", {"symbol": "BTC", "gate": "g1"},
            priority=TaskPriority.HIGH, required_capabilities=["analysis"],
        )  # fmt: skip
        assert handle.task_id.startswith("task_")
        assert client.follows_events
        waiting = asyncio.create_task(handle.result(timeout=20))

        async def running() -> bool:
            return (await handle.status())["status"] == "running"

        await wait_until(running, timeout=10)
        assert not waiting.done()

        # Then once it ends, result gives its final status with the handler's result
        gates.setdefault("g1", asyncio.Event()).set()
        final = await waiting
        assert final["status"] == "completed"
        assert final["result"] == {"echo": {"symbol": "BTC", "gate": "g1"}, "agent": "client_agent"}
        assert final["priority"] == "high"

        # And a task that ended before anyone waited is seen at once
        quick = await client.submit("quick", "", "analysis", {"n": 1})
        assert (await quick.result(timeout=20))["status"] == "completed"
        assert (await quick.result(timeout=20))["status"] == "completed"

        # And a failure is a final status too, with the error
        failing = await client.submit("bad", "", "analysis", {"fail": "boom"}, max_retries=0)
        ended = await failing.result(timeout=20)
        assert ended["status"] == "failed"
        assert "boom" in ended["error_message"]


async def test_a_wait_outlasts_an_orchestrator_behind_on_its_events(served) -> None:
    """Under load the orchestrator may handle a task's final event seconds after
    the agent sent it: the handle, woken by that event, asks until the status
    moves, rather than sleeping its hour-long re-check through it."""
    harness, gates = served
    orchestrator = harness.orchestrator
    assert orchestrator is not None
    lag = sum(client_module.SETTLE_DELAYS) + 0.5  # past every quick re-ask after the event
    answer = orchestrator.get_task_status
    completed_at: dict[str, float] = {}
    loop = asyncio.get_running_loop()

    async def behind(task_id: str) -> dict[str, Any]:
        # Given an orchestrator that tells a task's end only `lag` seconds after it
        status = await answer(task_id)
        if status["status"] == "completed":
            if loop.time() - completed_at.setdefault(task_id, loop.time()) < lag:
                return {**status, "status": "running", "result": None}
        return status

    orchestrator.get_task_status = behind  # type: ignore[method-assign]
    async with client_of(harness) as client:
        # When a service waits for a task that ends once released
        handle = await client.submit("late", "", "analysis", {"gate": "late"})
        waiting = asyncio.create_task(handle.result(timeout=20))

        async def running() -> bool:
            return (await handle.status())["status"] == "running"

        await wait_until(running, timeout=10)
        gates.setdefault("late", asyncio.Event()).set()

        # Then the result comes once the orchestrator tells it, not an hour later
        assert (await waiting)["status"] == "completed"


async def test_cancel_result_timeout_and_errors(served) -> None:
    harness, _gates = served
    async with client_of(harness) as client:
        # Given a task no agent can run
        harness.queue_keys.add("nobody")
        stuck = await client.submit("stuck", "", "idle", {}, required_capabilities=["nobody"])

        # When a result is awaited for a moment, then it times out and the task goes on
        with pytest.raises(TimeoutError):
            await stuck.result(timeout=0.3)
        assert (await stuck.status())["status"] == "pending"

        # When it is cancelled while a result is awaited, then the wait ends cancelled
        waiting = asyncio.create_task(stuck.result(timeout=20))
        assert await stuck.cancel() is True
        assert (await waiting)["status"] == "cancelled"
        assert await stuck.cancel() is False  # once

        # Errors are the seed's: a bad field is a ValueError naming it
        with pytest.raises(ValueError, match=r"^priority: must be one of"):
            await client.submit("x", "", "analysis", {}, priority="urgent")
        with pytest.raises(ValueError, match=r"^dependencies: unknown task id 'task_nope'"):
            await client.submit("x", "", "analysis", {}, dependencies=["task_nope"])
        with pytest.raises(ValueError, match=r"^no_such_field: not a field of a submit"):
            await client.submit("x", "", "analysis", {}, no_such_field=1)
        # an unknown task a KeyError; the seed's get_task_status gives None
        with pytest.raises(KeyError, match="unknown task 'task_nope'"):
            await client.status("task_nope")
        with pytest.raises(KeyError):
            await client.cancel("task_nope")
        assert await client.get_task_status("task_nope") is None
        with pytest.raises(ValueError, match=r"^status"):
            await client.tasks(status="sleeping")
        with pytest.raises(ValueError, match=r"^limit"):
            await client.tasks(limit=0)


async def test_an_end_no_event_announces_is_seen_at_the_next_re_check(served) -> None:
    harness, gates = served
    client = client_of(harness)
    client.resync_interval = 0.3
    async with client:
        # Given a task that runs until released, and one that depends on it
        first = await client.submit("first", "", "analysis", {"gate": "g3", "fail": "no"},
                                    max_retries=0)  # fmt: skip
        second = await client.submit("second", "", "analysis", {}, dependencies=[first.task_id])
        waiting = asyncio.create_task(second.result(timeout=20))

        # When the first fails, then the second ends failed too, though no agent
        # ran it to say so: the handle's re-check sees it
        gates.setdefault("g3", asyncio.Event()).set()
        assert (await first.result(timeout=20))["status"] == "failed"
        ended = await waiting
        assert ended["status"] == "failed"
        assert ended["assigned_agent"] is None


async def test_stats_agents_and_task_lists_with_filters(served) -> None:
    harness, gates = served
    async with client_of(harness) as client:
        # Given a completed task, a failed one, a running one and a waiting one
        done = await client.submit("done", "", "analysis", {})
        await done.result(timeout=20)
        failed = await client.submit("failed", "", "report", {"fail": "no"}, max_retries=0)
        await failed.result(timeout=20)
        running = await client.submit("running", "", "analysis", {"gate": "g2"})

        async def is_running() -> bool:
            return (await running.status())["status"] == "running"

        await wait_until(is_running, timeout=10)
        harness.queue_keys.add("idle.nobody")
        waiting = await client.submit("waiting", "", "idle", {}, required_capabilities=["nobody"])

        # Then the list is newest first, filtered by status, type and agent
        listed = await client.tasks()
        assert [t["task_id"] for t in listed] == [
            waiting.task_id, running.task_id, failed.task_id, done.task_id
        ]  # fmt: skip
        assert set(listed[0]) >= {"task_id", "name", "task_type", "status", "assigned_agent"}
        assert [t["task_id"] for t in await client.tasks(status="completed")] == [done.task_id]
        both = await client.tasks(status=["failed", "pending"])
        assert {t["task_id"] for t in both} == {failed.task_id, waiting.task_id}
        assert [t["task_id"] for t in await client.tasks(task_type="report")] == [failed.task_id]
        on_agent = await client.tasks(agent_id="client_agent")
        assert {t["task_id"] for t in on_agent} == {done.task_id, failed.task_id, running.task_id}
        assert [t["task_id"] for t in await client.tasks(limit=2)] == [
            waiting.task_id, running.task_id
        ]  # fmt: skip
        assert await client.tasks(task_type="analysis", status="failed") == []

        # And the orchestrator's own API lists the same
        orchestrator = harness.orchestrator
        assert orchestrator is not None
        assert await orchestrator.list_tasks(status="running") == await client.tasks(
            status="running"
        )
        assert await orchestrator.list_tasks(TaskStatus.FAILED, "report") == await client.tasks(
            "failed", "report"
        )
        with pytest.raises(ValueError, match=r"^limit: must be an integer from 1 to 1000"):
            await orchestrator.list_tasks(limit=1001)
        with pytest.raises(ValueError, match=r"^status: must be one of pending, "):
            await orchestrator.list_tasks(status=["running", "asleep"])

        # And stats and agents are get_stats and the registered agents
        stats = await client.stats()
        assert (stats["tasks_created"], stats["tasks_completed"]) == (4, 1)
        assert [a["agent_id"] for a in await client.agents()] == ["client_agent"]
        gates.setdefault("g2", asyncio.Event()).set()
        assert (await running.result(timeout=20))["status"] == "completed"


# --- from another process, against serve -------------------------------------------------

CLIENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from orchestrator import Client, SyncClient

    url, prefix = sys.argv[1], sys.argv[2]
    out = {}

    async def with_async_client():
        async with Client(url, prefix=prefix, resync_interval=3600) as client:
            handle = await client.submit("async", "", "analysis", {"sleep": 0.3},
                                         required_capabilities=["analysis"])
            out["async_id"] = handle.task_id
            out["async_final"] = await handle.result(timeout=30)
            stuck = await client.submit("stuck", "", "idle", {}, required_capabilities=["nobody"])
            out["stuck_id"] = stuck.task_id
            out["cancelled"] = await stuck.cancel()
            out["stuck_final"] = await stuck.result(timeout=30)
            try:
                await client.status("task_nope")
            except KeyError as exc:
                out["unknown"] = str(exc)

    asyncio.run(with_async_client())

    with SyncClient(url, prefix=prefix, resync_interval=3600) as client:
        handle = client.submit("sync", "", "analysis", {"n": 2})
        out["sync_id"] = handle.task_id
        out["sync_final"] = handle.result(timeout=30)
        out["listed"] = [t["task_id"] for t in client.tasks(limit=10)]
        out["completed"] = [t["task_id"] for t in client.tasks(status="completed")]
        out["agents"] = [a["agent_id"] for a in client.agents()]
        out["stats"] = client.stats()
        try:
            client.submit("bad", "", "analysis", {}, priority="urgent")
        except ValueError as exc:
            out["bad"] = str(exc)
    print(json.dumps(out))
    """
)


@pytest.mark.rabbitmq
async def test_a_service_in_another_process_submits_waits_cancels_and_lists(
    prefix: str, tmp_path
) -> None:
    # Given `orchestrator serve` and `orchestrator agent run` on the broker
    deployment = Deployment(prefix, require_broker())
    try:
        await deployment.serve()
        await deployment.agent("client_proc_agent", "analysis")
        deployment.queue_keys.add("idle.nobody")
        script = tmp_path / "service.py"
        script.write_text(CLIENT_SCRIPT)

        # When a script uses Client and SyncClient
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(script), deployment.broker_url, prefix,
            cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
        assert process.returncode == 0, stderr.decode()
        out = json.loads(stdout)

        # Then its tasks ran on the agent and it saw their ends
        assert out["async_final"]["status"] == "completed"
        assert out["async_final"]["result"]["echo"] == {"sleep": 0.3}
        assert out["async_final"]["assigned_agent"] == "client_proc_agent"
        assert (out["cancelled"], out["stuck_final"]["status"]) == (True, "cancelled")
        assert out["sync_final"]["status"] == "completed"
        assert "unknown task 'task_nope'" in out["unknown"]
        assert out["bad"].startswith("priority: must be one of")
        # And it listed them newest first, and the agents and statistics
        assert out["listed"] == [out["sync_id"], out["stuck_id"], out["async_id"]]
        assert out["completed"] == [out["sync_id"], out["async_id"]]
        assert out["agents"] == ["client_proc_agent"]
        assert out["stats"]["tasks_created"] == 3
    finally:
        await deployment.close()


@pytest.mark.rabbitmq
async def test_the_readmes_client_example_runs_as_written(prefix: str, tmp_path) -> None:
    # Given serve and an agent with the README's capability, handling any task type
    from tests.test_readme import code_block

    deployment = Deployment(prefix, require_broker())
    try:
        await deployment.serve()
        await deployment.agent("readme_client_agent", "technical_analysis")
        script = tmp_path / "example.py"
        script.write_text(code_block("Submitting from another service", "python"))

        # When the README's example runs, with the broker and prefix in its environment
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(script), cwd=tmp_path, env=deployment.env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(process.communicate(), 90)

        # Then both of its tasks completed
        assert process.returncode == 0, stderr.decode()
        lines = stdout.decode().splitlines()
        assert lines[0].startswith("completed {"), lines
        assert "'symbol': 'BTC'" in lines[0]
        assert lines[-1] == "completed"
    finally:
        await deployment.close()


@pytest.mark.rabbitmq
async def test_the_client_needs_only_a_clients_permissions(users: Users, prefix: str) -> None:  # noqa: F811
    # Given the orchestrator and an agent as their users, on a vhost of the test's own
    orchestrator = TaskOrchestrator(bus(users, "orchestrator", prefix), settings=FAST)
    await orchestrator.start()
    service = OrchestratorService(orchestrator)
    await service.start()
    agent = Agent(AGENT_ID, ["perm"], 2, heartbeat_interval=0.3)

    async def double(ctx: TaskContext) -> dict[str, Any]:
        return {"doubled": ctx.payload["n"] * 2}

    agent.add_handler("*", double)
    try:
        await agent.start(bus(users, "agent", prefix))

        async def registered() -> bool:
            return AGENT_ID in {a.agent_id for a in await orchestrator.get_agents()}

        await wait_until(registered, timeout=15)

        # When a service submits and waits as the client user
        async with Client(users.urls["client"], prefix=prefix, resync_interval=HOUR) as client:
            handle = await client.submit(
                "double", "", "math", {"n": 21}, required_capabilities=["perm"]
            )
            final = await handle.result(timeout=20)

            # Then its result came on the task's event, through its own monitor queue
            assert client.follows_events
            assert (final["status"], final["result"]) == ("completed", {"doubled": 42})
            assert [t["task_id"] for t in await client.tasks()] == [handle.task_id]
            assert [a["agent_id"] for a in await client.agents()] == [AGENT_ID]
    finally:
        await agent.stop(drain_timeout=0.5)
        await service.stop()
        await orchestrator.stop()
        await orchestrator.bus.close()


def test_the_three_submits_take_the_same_parameters() -> None:
    """One parameter list (``SubmitArguments``) for the orchestrator and both clients."""

    # Given the parameters each of the three shows (to inspect, help and editors)
    def shown(method: Any) -> list[tuple[str, Any, Any]]:
        parameters = list(inspect.signature(method).parameters.values())[1:]  # not self
        return [(p.name, p.kind, p.default) for p in parameters if p.name != "extra"]

    seed = shown(TaskOrchestrator.submit_task)
    # Then they are the same, the seed's first, in its order and with its defaults
    assert shown(Client.submit) == seed
    assert shown(SyncClient.submit) == seed
    assert [name for name, _, _ in seed] == [
        "name", "description", "task_type", "payload", "priority", "dependencies",
        "required_capabilities", "estimated_duration", "timeout", "max_retries",
        "idempotency_key",
    ]  # fmt: skip
    defaults = {name: default for name, _, default in seed}
    assert defaults["priority"] is TaskPriority.MEDIUM
    assert (defaults["estimated_duration"], defaults["timeout"], defaults["max_retries"]) == (
        300,
        600,
        3,
    )
    # and the wire's request has a field for each, with the same defaults
    wire = {
        name: field
        for name, field in SubmitTaskRequest.model_fields.items()
        if name not in {"v", "kind"}
    }
    assert set(wire) == set(defaults)
    for name in ("estimated_duration", "timeout", "max_retries", "idempotency_key"):
        assert wire[name].default == defaults[name], name
    # the clients also take fields a newer protocol may add; the orchestrator does not
    assert "extra" in inspect.signature(Client.submit).parameters
    assert "extra" not in inspect.signature(TaskOrchestrator.submit_task).parameters


async def test_submit_task_binds_as_its_written_signature() -> None:
    """Positions, keywords and an unknown name behave as in the seed's signature."""
    orchestrator = TaskOrchestrator(MemoryBus())
    # When a call names a parameter there is not, then it is a TypeError (not a ValueError)
    with pytest.raises(TypeError, match="urgency"):
        await orchestrator.submit_task("x", "", "analysis", {}, urgency="high")
    with pytest.raises(TypeError, match="multiple values"):
        await orchestrator.submit_task("x", "", "analysis", {}, name="y")
    with pytest.raises(TypeError, match="payload"):
        await orchestrator.submit_task("x", "", "analysis")
