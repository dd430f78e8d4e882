"""A ``TaskOrchestrator`` in a second process stands by, never a second brain (issue 12).

The seed's API used from two services: a plain ``TaskOrchestrator`` leads
in this process, another starts in a process of its own
(``tests/standby_app.py``) on the same prefix of the real broker and the
same SQLite file. The second stands by and names the leader, though a
plain ``TaskOrchestrator`` answers no stats request (it reads the store's
epoch row); its API refuses; the first's tasks all complete, each once;
when the first stops, the second takes over and runs a task. And a standby
follows who leads: a third names the second once it took over.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from agents import TaskContext
from broker import BusSettings
from orchestrator import SQLiteStore, TaskOrchestrator
from tests.harness import FAST, ROOT, Harness, wait_all, wait_until

FAST_LEASE = 0.2
CAPABILITY = "standby_process"
LINE_TIMEOUT = 30.0
"""Seconds to wait for the next line of the second process (each comes in a second or two)."""


@pytest.fixture
async def rabbitmq_harness(prefix: str, broker_url: str):
    h = Harness(
        "rabbitmq",
        BusSettings(broker_url=broker_url, prefix=prefix, amqp_heartbeat=5, connect_attempts=1),
    )
    try:
        yield h
    finally:
        await h.close()


class Second:
    """The second orchestrator's process: its JSON lines, one step at a time."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process, self.log = process, log

    @classmethod
    async def start(cls, settings: BusSettings, store: Path, log: Path) -> Second:
        env = {
            **os.environ,
            "ORCHESTRATOR_BROKER_URL": settings.broker_url or "",
            "ORCHESTRATOR_PREFIX": settings.prefix,
            "STANDBY_STORE": str(store),
            "STANDBY_CAPABILITY": CAPABILITY,
            "PYTHONPATH": str(ROOT),
        }
        with log.open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.standby_app",
                cwd=ROOT,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )
        return cls(process, log)

    async def next(self, step: str) -> dict[str, Any]:
        """Its next line, which must be ``step``."""
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), LINE_TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"no {step!r} line:\n{self.log.read_text()}") from None
        assert line, f"it exited before {step!r}:\n{self.log.read_text()}"
        said = json.loads(line)
        assert said["step"] == step, (said, self.log.read_text())
        return said

    async def finish(self) -> int:
        """Tell it to stop (a line on stdin); its exit code."""
        assert self.process.stdin is not None
        if self.process.returncode is None:
            self.process.stdin.write(b"stop\n")
            await self.process.stdin.drain()
            try:
                return await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
        return await self.process.wait()


@pytest.mark.rabbitmq
async def test_a_task_orchestrator_in_a_second_process_stands_by_then_takes_over(
    rabbitmq_harness: Harness, tmp_path: Path
) -> None:
    harness = rabbitmq_harness
    # Given a plain TaskOrchestrator leading on a SQLite file, an agent that counts its runs
    path = tmp_path / "state.sqlite"
    runs: collections.Counter[str] = collections.Counter()

    async def counted(ctx: TaskContext) -> dict[str, Any]:
        runs[ctx.task_id] += 1
        return {"n": ctx.payload["n"]}

    first = TaskOrchestrator(await harness.connected_bus(), settings=FAST, store=SQLiteStore(path))
    first.leadership.poll_interval = FAST_LEASE
    await first.start()
    harness.orchestrator = first
    await harness.start_agent("sp_agent", [CAPABILITY], 10, counted)

    async def submit(numbers: range) -> list[str]:
        return [
            await first.submit_task("t", "", "work", {"n": n}, required_capabilities=[CAPABILITY])
            for n in numbers
        ]

    before = await submit(range(30))

    # When a second TaskOrchestrator starts in another process, on the same prefix and file
    second = await Second.start(harness.settings, path, tmp_path / "second.log")
    try:
        # Then it stands by, naming the leader (id and epoch); its submit is refused
        started = (await second.next("started"))["stats"]
        assert started["role"] == "standby"
        assert started["leader"] == {"id": first.leadership.holder, "epoch": 1}
        assert started["orchestrator_id"] != first.leadership.holder
        refused = (await second.next("submit")).get("refused", "")
        assert refused.startswith("not_leader"), refused
        assert first.leadership.holder in refused

        # And the first goes on leading: every task completes, each once
        more = await submit(range(30, 60))
        done = await wait_all(first, before + more, timeout=60)
        assert [d["status"] for d in done] == ["completed"] * 60
        assert [d["result"] for d in done] == [{"n": n} for n in range(60)]
        assert (await first.get_stats())["role"] == "leader"

        # When the first stops, then the second takes over under a newer epoch
        await first.stop()
        leading = (await second.next("leading"))["stats"]
        assert leading["role"] == "leader"
        assert leading["leader"] == {"id": leading["orchestrator_id"], "epoch": 2}

        # And it runs a task of its own on the agent the first had
        after = await second.next("done")
        assert (after["status"], after["result"]) == ("completed", {"n": -1})
    finally:
        code = await second.finish()
    assert code == 0, second.log.read_text()
    assert sorted(runs.values()) == [1] * 61, runs
    assert set(runs) == {*before, *more, after["task_id"]}


async def test_a_standby_follows_who_leads_from_the_store(harness: Harness, tmp_path: Path) -> None:
    # Given three plain TaskOrchestrators on one prefix and SQLite file: one leads
    path = tmp_path / "state.sqlite"

    async def started() -> TaskOrchestrator:
        orchestrator = TaskOrchestrator(
            await harness.connected_bus(), settings=FAST, store=SQLiteStore(path)
        )
        orchestrator.leadership.poll_interval = FAST_LEASE
        await orchestrator.start()
        return orchestrator

    first = await started()
    harness.orchestrator = first
    second, third = await started(), await started()
    try:
        for standby in (second, third):
            assert (await standby.get_stats())["leader"] == {
                "id": first.leadership.holder,
                "epoch": 1,
            }

        # When the first stops and one of the others takes over
        await first.stop()

        async def one_leads() -> bool:
            return second.leadership.is_leader or third.leadership.is_leader

        await wait_until(one_leads, timeout=10)
        leader, standby = (second, third) if second.leadership.is_leader else (third, second)
        harness.orchestrator = leader

        # Then the one still standing by names the new leader, under epoch 2
        new = {"id": leader.leadership.holder, "epoch": 2}

        async def names_it() -> bool:
            return (await standby.get_stats())["leader"] == new

        await wait_until(names_it, timeout=10)
        assert (await leader.get_stats())["leader"] == new
        assert (await standby.get_stats())["role"] == "standby"
    finally:
        for orchestrator in (second, third):
            if orchestrator is not harness.orchestrator:
                await orchestrator.stop()
