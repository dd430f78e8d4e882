"""The seed's trading workflow, end to end, with example agents.

In-process by default; with a broker URL the orchestrator and each agent get
their own RabbitMQ connection, as separate services would, and the
orchestrator answers the request protocol, so that ``orchestrator watch``
can follow it. It prints each task's result as JSON, ends by itself and
prints a summary. (This entry point runs agents, so it imports both
packages; the orchestrator's core never does.)
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from typing import Any

from agents import Agent, TaskContext
from broker import BusSettings, CommunicationBus, MemoryBus, QueuesRequest, RabbitMQBus

from .models import TaskPriority
from .service import OrchestratorService
from .task_orchestrator import TaskOrchestrator


def example_agents() -> list[Agent]:
    analyst = Agent("analysis_agent_1", ["technical_analysis", "sentiment_analysis"], 5)
    risk = Agent("risk_agent_1", ["risk_management", "portfolio_analysis"], 2)
    trader = Agent("trading_agent_1", ["trading", "order_execution"], 3)

    @analyst.handler("analysis")
    async def analyse(ctx: TaskContext) -> dict[str, Any]:
        for step in range(1, 4):
            await asyncio.sleep(0.05)
            ctx.progress(step / 3)
        symbol = ctx.payload["symbols"][0]
        return {"symbol": symbol, "rsi": round(random.uniform(20, 80), 1), "trend": "up"}

    @risk.handler("risk_analysis")
    def assess(ctx: TaskContext) -> dict[str, Any]:  # sync handlers run in a thread
        analysis = ctx.dependency_results[ctx.payload["analysis_task_id"]]
        size = 0.02 if analysis["rsi"] < 70 else 0.005
        return {"symbol": analysis["symbol"], "position_size": size, "approved": True}

    @trader.handler("trading")
    async def trade(ctx: TaskContext) -> dict[str, Any]:
        risk_result = ctx.dependency_results[ctx.payload["risk_task_id"]]
        await asyncio.sleep(0.05)
        return {"order_id": uuid.uuid4().hex[:8], "filled": risk_result["position_size"]}

    return [analyst, risk, trader]


async def create_trading_workflow(orchestrator: TaskOrchestrator) -> list[str]:
    """The seed's "Complex Workflow with Dependencies", as written there."""
    analysis_task = await orchestrator.submit_task(
        name="Market Analysis",
        description="Comprehensive market analysis",
        task_type="analysis",
        payload={"symbols": ["BTC"], "indicators": ["rsi", "macd", "volume"]},
        priority=TaskPriority.HIGH,
        required_capabilities=["technical_analysis"],
    )
    risk_task = await orchestrator.submit_task(
        name="Risk Assessment",
        description="Evaluate trading risks",
        task_type="risk_analysis",
        payload={"analysis_task_id": analysis_task},
        dependencies=[analysis_task],
        priority=TaskPriority.CRITICAL,
        required_capabilities=["risk_management"],
    )
    trade_task = await orchestrator.submit_task(
        name="Execute Trade",
        description="Execute trading decision",
        task_type="trading",
        payload={"risk_task_id": risk_task},
        dependencies=[risk_task],
        priority=TaskPriority.CRITICAL,
        required_capabilities=["trading"],
    )
    return [analysis_task, risk_task, trade_task]


async def run_demo(
    broker_url: str | None = None, workflows: int = 3, prefix: str | None = None
) -> dict[str, Any]:
    """Run ``workflows`` trading workflows; print each task's outcome, as JSON, and a summary.

    On a broker the orchestrator also answers the request protocol, so that
    ``orchestrator watch``, ``status`` and ``stats`` can follow the demo. With
    no ``prefix`` it runs under a fresh one and deletes its queues at the end;
    with one it keeps them, so that a ``watch`` of that prefix started before
    the next run sees it from the start.
    """
    keep = prefix is not None
    settings = BusSettings(broker_url=broker_url, prefix=prefix or f"demo-{uuid.uuid4().hex[:6]}")
    shared = MemoryBus(settings=settings) if not broker_url else None

    def bus() -> CommunicationBus:
        return shared if shared is not None else RabbitMQBus(settings=settings)

    orchestrator_bus = bus()
    where = getattr(orchestrator_bus, "address", None) or "the in-process bus"
    print(f"demo on {where} (prefix {settings.prefix})", flush=True)
    orchestrator = TaskOrchestrator(orchestrator_bus)
    service = OrchestratorService(orchestrator)
    agents = example_agents()
    started: list[Agent] = []
    try:
        await orchestrator.start()
        if shared is None:
            await service.start()
            if keep:
                print(f"follow it with: orchestrator watch --prefix {settings.prefix}", flush=True)
        for agent in agents:
            await agent.start(bus())
            started.append(agent)
        # No need to wait for the agents: tasks wait in their queues until
        # an agent that covers them announces itself and is told to consume.
        began = time.time()
        chains = [await create_trading_workflow(orchestrator) for _ in range(workflows)]
        for chain in chains:
            for task_id in chain:
                status = await orchestrator.wait_for_task(task_id, timeout=60)
                print(describe(status), flush=True)
        elapsed = time.time() - began
        stats = await orchestrator.get_stats()
    finally:
        for agent in started:
            await agent.stop()
        # The task queues it used, as the protocol lists them (before it stops).
        queues = await service.handle(QueuesRequest()) if shared is None else None
        await service.stop()
        await orchestrator.stop()
        if broker_url and not keep:
            keys = [queue["key"] for queue in queues.result] if queues and queues.ok else []
            cleaner = RabbitMQBus(settings=settings)
            await cleaner.connect()
            try:
                await cleaner.delete_topology(keys)
            finally:
                await cleaner.close()
    print(
        f"{stats['tasks_completed']} of {stats['tasks_created']} tasks completed, "
        f"{stats['tasks_failed']} failed, in {elapsed:.2f}s; "
        f"average run {stats['avg_completion_time'] * 1000:.0f} ms"
    )
    if keep and broker_url:
        print(f"the queues of prefix {settings.prefix} are kept for the next run")
    return stats


def describe(status: dict[str, Any]) -> str:
    """One task's line: name, status, agent, and its result (or error) as JSON."""
    outcome = status["result"] if status["result"] is not None else status["error_message"]
    return (
        f"  {status['name']:<16} {status['status']:<10} on {status['assigned_agent'] or '-':<17}"
        f" {json.dumps(outcome)}"
    )
