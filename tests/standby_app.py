"""A ``TaskOrchestrator`` in a process of its own, for tests of a second one on a prefix.

As a service using the API would run it: a plain ``TaskOrchestrator`` (no
``orchestrator serve``) on a SQLite file, started while another leads. It
says what it sees as JSON lines on stdout, each ``{"step": ..., ...}``:

- ``started``: its ``get_stats()`` (role, orchestrator id, leader);
- ``submit``: what its ``submit_task`` did (``refused``: the ``NotLeader``
  message, or ``task_id``);
- ``leading``: once it took over, its ``get_stats()``;
- ``done``: the final status of a task it then submitted (type ``work``,
  capability ``STANDBY_CAPABILITY``, payload ``{"n": -1}``).

A line (or the end) on stdin stops it, after its steps or in the middle. Configured
by ORCHESTRATOR_BROKER_URL, ORCHESTRATOR_PREFIX, STANDBY_STORE (the SQLite
path), STANDBY_CAPABILITY.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from broker import BusSettings, RabbitMQBus
from orchestrator import NotLeader, SQLiteStore, TaskOrchestrator
from tests.harness import FAST

LEASE_POLL = 0.2


def say(step: str, **fields: Any) -> None:
    print(json.dumps({"step": step, **fields}), flush=True)


def stats_of(stats: dict[str, Any]) -> dict[str, Any]:
    return {key: stats[key] for key in ("role", "orchestrator_id", "leader")}


async def main() -> None:
    settings = BusSettings(
        broker_url=os.environ["ORCHESTRATOR_BROKER_URL"],
        prefix=os.environ["ORCHESTRATOR_PREFIX"],
        amqp_heartbeat=5,
        connect_attempts=1,
    )
    capability = os.environ["STANDBY_CAPABILITY"]
    orchestrator = TaskOrchestrator(
        RabbitMQBus(settings=settings),
        settings=FAST,
        store=SQLiteStore(os.environ["STANDBY_STORE"]),
    )
    orchestrator.leadership.poll_interval = LEASE_POLL
    await orchestrator.start()
    steps = asyncio.ensure_future(told(run(orchestrator, capability)))
    try:
        # Until told to stop, in the middle of a step too (a test that failed)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    finally:
        steps.cancel()
        await asyncio.gather(steps, return_exceptions=True)
        await orchestrator.stop()


async def told(steps: Any) -> None:
    """The steps; a failure is said too (``error``), so a test need not wait for a line."""
    try:
        await steps
    except Exception as exc:
        say("error", error=repr(exc))
        raise


async def run(orchestrator: TaskOrchestrator, capability: str) -> None:
    say("started", stats=stats_of(await orchestrator.get_stats()))
    try:
        task_id = await orchestrator.submit_task("early", "", "work", {"n": -2})
        say("submit", task_id=task_id)
    except NotLeader as exc:
        say("submit", refused=str(exc))
    await orchestrator.leadership.wait_leading()
    say("leading", stats=stats_of(await orchestrator.get_stats()))
    task_id = await orchestrator.submit_task(
        "after", "", "work", {"n": -1}, required_capabilities=[capability]
    )
    status = await orchestrator.wait_for_task(task_id, timeout=60)
    say("done", status=status["status"], result=status["result"], task_id=task_id)


if __name__ == "__main__":
    asyncio.run(main())
