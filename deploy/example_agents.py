"""The demo's three example agents, one object each, for ``orchestrator agent run``.

    orchestrator agent run deploy.example_agents:analyst
    orchestrator agent run deploy.example_agents:risk
    orchestrator agent run deploy.example_agents:trader

They do what ``orchestrator/demo.py``'s agents do (the seed's trading
workflow: analysis, then risk assessment, then the trade). Each agent's id is
``AGENT_ID`` if set, else its role and the host name, so that replicas
(``docker compose up --scale analyst=3``) get ids of their own: two agents
sharing an id would share one control queue and one record in the orchestrator.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import uuid
from typing import Any

from agents import Agent, TaskContext


def agent_id(role: str) -> str:
    """``AGENT_ID``, else ``<role>-<host name>`` (a container's id under Docker)."""
    configured = os.environ.get("AGENT_ID")
    if configured:
        return configured
    host = re.sub(r"[^A-Za-z0-9_.:-]", "-", socket.gethostname())[:100]
    return f"{role}-{host}"


analyst = Agent(agent_id("analyst"), ["technical_analysis", "sentiment_analysis"], 5)
risk = Agent(agent_id("risk"), ["risk_management", "portfolio_analysis"], 2)
trader = Agent(agent_id("trader"), ["trading", "order_execution"], 3)


@analyst.handler("analysis")
async def analyse(ctx: TaskContext) -> dict[str, Any]:
    for step in range(1, 4):
        await asyncio.sleep(0.5)
        ctx.progress(step / 3)
    symbol = (ctx.payload.get("symbols") or ["BTC"])[0]
    return {"symbol": symbol, "rsi": round(random.uniform(20, 80), 1), "trend": "up"}


@risk.handler("risk_analysis")
def assess(ctx: TaskContext) -> dict[str, Any]:  # sync handlers run in a thread
    analysis_id = ctx.payload.get("analysis_task_id")
    analysis = ctx.dependency_results.get(analysis_id) or {"symbol": "BTC", "rsi": 50.0}
    size = 0.02 if analysis["rsi"] < 70 else 0.005
    return {"symbol": analysis["symbol"], "position_size": size, "approved": True}


@trader.handler("trading")
async def trade(ctx: TaskContext) -> dict[str, Any]:
    risk_id = ctx.payload.get("risk_task_id")
    risk_result = ctx.dependency_results.get(risk_id) or {"position_size": 0.0}
    await asyncio.sleep(0.2)
    return {"order_id": uuid.uuid4().hex[:8], "filled": risk_result["position_size"]}
