"""An agent for tests that run agents in their own processes.

Configured by environment: AGENT_ID, AGENT_CAPABILITIES (comma-separated),
AGENT_MAX (max concurrent tasks), AGENT_SLEEP (seconds each task takes),
AGENT_HEARTBEAT (seconds), AGENT_DRAIN (the graceful stop's drain timeout).
The broker and prefix come from ORCHESTRATOR_*.

A task's payload can steer it: ``sleep`` (seconds, instead of AGENT_SLEEP),
``hang_on`` (an agent id: that agent never finishes it), ``until_stopping``
(true: it ends only once its agent has begun a graceful stop). The result
echoes the payload and says which agent and process ran it, the most tasks
that agent has run at once so far (``max_running``, counted inside it), and
whether it waited for its agent's stop to begin (``stopping``).
"""

from __future__ import annotations

import asyncio
import os

from agents import Agent, TaskContext


def make_agent() -> Agent:
    agent = Agent(
        os.environ["AGENT_ID"],
        [c for c in os.environ.get("AGENT_CAPABILITIES", "").split(",") if c],
        int(os.environ.get("AGENT_MAX", "5")),
        heartbeat_interval=float(os.environ.get("AGENT_HEARTBEAT", "0.3")),
        drain_timeout=float(os.environ.get("AGENT_DRAIN", "1")),
    )
    sleep = float(os.environ.get("AGENT_SLEEP", "0"))

    @agent.handler()
    async def work(ctx: TaskContext) -> dict:
        ctx.progress(0.5)
        if ctx.payload.get("hang_on") == ctx.agent_id:
            await asyncio.sleep(3600)  # this agent is about to be killed
        stopping = False
        if ctx.payload.get("until_stopping"):
            await agent.wait_stopping()
            stopping = True
        if sleep or ctx.payload.get("sleep"):
            await asyncio.sleep(float(ctx.payload.get("sleep", sleep)))
        return {
            "echo": ctx.payload,
            "agent": ctx.agent_id,
            "pid": os.getpid(),
            "max_running": agent.counters.max_running,
            "stopping": stopping,
        }

    return agent
