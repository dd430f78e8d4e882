"""Property tests of the scheduler's invariants over random workflows.

Random DAGs of tasks whose handlers succeed, fail for a while, always fail or
hang past their timeout, some cancelled at random moments, on agents with
random limits. Whatever happens: every task ends in exactly one final state,
no task starts before all its dependencies completed, ``retry_count`` never
exceeds ``max_retries``, and no agent runs more than its limit.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents import TaskContext
from broker import BusSettings
from orchestrator import MemoryStore, OrchestratorSettings, Task
from tests.conftest import BROKER_URL, require_broker
from tests.harness import Harness, wait_all

FINAL = {"completed", "failed", "timeout", "cancelled"}
QUICK = OrchestratorSettings(
    heartbeat_timeout=5.0,
    monitor_interval=0.05,
    retry_base_delay=0.01,
    retry_max_delay=0.05,
    timeout_grace=0.2,
)


class RecordingStore(MemoryStore):
    """A state store that writes down every status a task is saved with.

    The orchestrator saves a task on every change of state (its store is a
    constructor argument), so this sees every transition into a final state,
    however it came about: an agent's report, a retry running out, the
    orchestrator's own deadline, a cancel, a dependency ending, a dead letter.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, str] = {}
        self.final_changes: Counter[str] = Counter()
        self.violations: list[str] = []

    async def save_task(self, task: Task) -> None:
        status = task.status.value
        before = self.last.get(task.task_id)
        if before in FINAL and status != before:
            self.violations.append(f"{task.task_id} saved {status} after it ended {before}")
        if status in FINAL and before not in FINAL:
            self.final_changes[task.task_id] += 1
        self.last[task.task_id] = status
        await super().save_task(task)


@dataclass(frozen=True)
class Spec:
    deps: tuple[int, ...]
    behaviour: str  # ok | flaky | fail | hang
    fail_attempts: int
    max_retries: int
    cancel_after: float | None


@st.composite
def workflows(draw: st.DrawFn) -> tuple[list[Spec], list[int]]:
    specs = []
    for i in range(draw(st.integers(1, 20))):
        deps = draw(st.lists(st.integers(0, i - 1), max_size=3, unique=True)) if i else []
        behaviour = draw(st.sampled_from(["ok", "ok", "ok", "flaky", "fail", "hang"]))
        specs.append(
            Spec(
                deps=tuple(deps),
                behaviour=behaviour,
                fail_attempts=draw(st.integers(1, 3)),
                max_retries=draw(st.integers(0, 2)),
                cancel_after=draw(st.one_of(st.none(), st.none(), st.floats(0, 0.1))),
            )
        )
    limits = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    return specs, limits


async def run_workflow(bus_kind: str, specs: list[Spec], limits: list[int]) -> None:
    url = BROKER_URL if bus_kind == "rabbitmq" else None
    harness = Harness(bus_kind, BusSettings(broker_url=url, prefix=f"prop-{uuid.uuid4().hex[:8]}"))
    try:
        await _check(harness, specs, limits)
    finally:
        await harness.close()


async def _check(harness: Harness, specs: list[Spec], limits: list[int]) -> None:
    store = RecordingStore()
    orchestrator = await harness.start_orchestrator(QUICK, store=store)
    violations: list[str] = []
    running: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    ids: list[str] = []

    async def handler(ctx: TaskContext) -> dict:
        spec = specs[ctx.payload["index"]]
        for dep in spec.deps:
            status = await orchestrator.get_task_status(ids[dep])
            if status["status"] != "completed":
                violations.append(f"task {ctx.payload['index']} started before dep {dep}")
        running[ctx.agent_id] += 1
        peak[ctx.agent_id] = max(peak[ctx.agent_id], running[ctx.agent_id])
        try:
            if spec.behaviour == "hang":
                await asyncio.sleep(30)
            await asyncio.sleep(0.001)
            if spec.behaviour == "fail" or (
                spec.behaviour == "flaky" and ctx.attempt <= spec.fail_attempts
            ):
                raise RuntimeError(f"attempt {ctx.attempt} fails")
        finally:
            running[ctx.agent_id] -= 1
        return {"index": ctx.payload["index"]}

    agents = [
        await harness.start_agent(f"agent_{i}", [], limit, handler, heartbeat_interval=1.0)
        for i, limit in enumerate(limits)
    ]
    cancels = []
    for index, spec in enumerate(specs):
        ids.append(
            await orchestrator.submit_task(
                name=f"t{index}",
                description="",
                task_type="job",
                payload={"index": index},
                dependencies=[ids[d] for d in spec.deps],
                max_retries=spec.max_retries,
                timeout=0.15 if spec.behaviour == "hang" else 10,
            )
        )
        if spec.cancel_after is not None:
            cancels.append(
                asyncio.create_task(_cancel_later(orchestrator, ids[-1], spec.cancel_after))
            )

    statuses = await wait_all(orchestrator, ids, timeout=60)
    await asyncio.gather(*cancels)
    await asyncio.sleep(0.05)
    again = [await orchestrator.get_task_status(t) for t in ids]

    assert not violations, violations
    # Every task changed into a final state exactly once, and never out of it
    assert not store.violations, store.violations
    assert store.final_changes == Counter(ids), store.final_changes
    for index, (status, later) in enumerate(zip(statuses, again, strict=True)):
        assert status["status"] in FINAL, (index, status)
        assert later["status"] == status["status"], (index, status, later)
        assert store.last[ids[index]] == status["status"], (index, status)
        assert status["retry_count"] <= specs[index].max_retries, (index, status)
        if status["status"] == "completed":
            assert all(statuses[d]["status"] == "completed" for d in specs[index].deps)
    for agent, limit in zip(agents, limits, strict=True):
        assert peak[agent.agent_id] <= limit
        assert agent.counters.max_running <= limit
    stats = await orchestrator.get_stats()
    assert stats["tasks_created"] == len(specs)
    assert stats["pending_tasks"] == stats["running_tasks"] == 0
    ended = Counter(s["status"] for s in statuses)
    assert stats["tasks_completed"] == ended["completed"]
    assert stats["tasks_failed"] == ended["failed"] + ended["timeout"]


async def _cancel_later(orchestrator, task_id: str, delay: float) -> None:
    await asyncio.sleep(delay)
    await orchestrator.cancel_task(task_id)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(workflows())
def test_invariants_in_process(workflow: tuple[list[Spec], list[int]]) -> None:
    asyncio.run(run_workflow("memory", *workflow))


@pytest.mark.rabbitmq
@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(workflows())
def test_invariants_on_rabbitmq(workflow: tuple[list[Spec], list[int]]) -> None:
    require_broker()
    asyncio.run(run_workflow("rabbitmq", *workflow))
