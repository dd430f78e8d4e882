"""An agent for tests that run agents in their own processes.

Configured by environment: AGENT_ID, AGENT_CAPABILITIES (comma-separated),
AGENT_MAX (max concurrent tasks), AGENT_SLEEP (seconds each task takes),
AGENT_HEARTBEAT (seconds). The broker and prefix come from ORCHESTRATOR_*.
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
        if sleep or ctx.payload.get("sleep"):
            await asyncio.sleep(float(ctx.payload.get("sleep", sleep)))
        return {"echo": ctx.payload, "agent": ctx.agent_id, "pid": os.getpid()}

    return agent
