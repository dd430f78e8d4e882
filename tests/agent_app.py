"""An agent for tests that run agents in their own processes.

Configured by environment: AGENT_ID, AGENT_CAPABILITIES (comma-separated),
AGENT_MAX (max concurrent tasks), AGENT_SLEEP (seconds each task takes),
AGENT_HEARTBEAT (seconds), AGENT_DRAIN (the graceful stop's drain timeout),
AGENT_LONG_AFTER (``long_task_after``: tasks with a longer timeout are
acknowledged when they start), AGENT_RUN_LOG (a file each handler appends a
line to when it starts, ends or is cancelled: ``start|end|cancelled <task id>
<attempt> <pid>``). The broker and prefix come from ORCHESTRATOR_*.

A task's payload can steer it: ``sleep`` (seconds, instead of AGENT_SLEEP),
``hang_on`` (an agent id: that agent never finishes it), ``until_stopping``
(true: it ends only once its agent has begun a graceful stop), ``until_file``
(a path: it ends once that file exists), ``deaf`` (true: it ignores its
cancellation while it waits for ``until_file``), ``fail`` (an error message:
it raises ``RuntimeError`` with it). The result echoes the payload and says
which agent and process ran it, the most tasks that agent has run at once so
far (``max_running``, counted inside it), and whether it waited for its
agent's stop to begin (``stopping``).
"""

from __future__ import annotations

import asyncio
import os

from agents import Agent, TaskContext

FILE_POLL = 0.02
"""How often a handler waiting for ``until_file`` looks for it."""


def _exists(path: str) -> bool:
    return os.path.exists(path)  # a stat: no need to leave the event loop for it


def make_agent() -> Agent:
    long_after = os.environ.get("AGENT_LONG_AFTER")
    agent = Agent(
        os.environ["AGENT_ID"],
        [c for c in os.environ.get("AGENT_CAPABILITIES", "").split(",") if c],
        int(os.environ.get("AGENT_MAX", "5")),
        heartbeat_interval=float(os.environ.get("AGENT_HEARTBEAT", "0.3")),
        drain_timeout=float(os.environ.get("AGENT_DRAIN", "1")),
        long_task_after=float(long_after) if long_after else 1500.0,
    )
    sleep = float(os.environ.get("AGENT_SLEEP", "0"))
    run_log = os.environ.get("AGENT_RUN_LOG")

    def note(what: str, ctx: TaskContext) -> None:
        if run_log:
            with open(run_log, "a") as out:
                out.write(f"{what} {ctx.task_id} {ctx.attempt} {os.getpid()}\n")

    async def until_file(path: str, deaf: bool) -> None:
        while not _exists(path):
            try:
                await asyncio.sleep(FILE_POLL)
            except asyncio.CancelledError:
                if not deaf:
                    raise

    @agent.handler()
    async def work(ctx: TaskContext) -> dict:
        note("start", ctx)
        try:
            ctx.progress(0.5)
            if ctx.payload.get("hang_on") == ctx.agent_id:
                await asyncio.sleep(3600)  # this agent is about to be killed
            stopping = False
            if ctx.payload.get("until_stopping"):
                await agent.wait_stopping()
                stopping = True
            if ctx.payload.get("until_file"):
                await until_file(ctx.payload["until_file"], bool(ctx.payload.get("deaf")))
            if sleep or ctx.payload.get("sleep"):
                await asyncio.sleep(float(ctx.payload.get("sleep", sleep)))
            if ctx.payload.get("fail"):
                raise RuntimeError(ctx.payload["fail"])
        except asyncio.CancelledError:
            note("cancelled", ctx)
            raise
        note("end", ctx)
        return {
            "echo": ctx.payload,
            "agent": ctx.agent_id,
            "pid": os.getpid(),
            "max_running": agent.counters.max_running,
            "stopping": stopping,
        }

    return agent
