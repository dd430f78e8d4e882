"""What an agent tells the orchestrator besides its tasks: who it is, and that
it still lives.

The announcement carries what ``register_agent`` would be given. Each
heartbeat also lists the attempts whose handlers run here: commands are
fire-and-forget, and one published while the agent's control queue was being
declared again after a reconnect is lost. The orchestrator compares the list
with its records and cancels again any attempt that ended or was superseded
meanwhile, so such a loss costs at most one heartbeat interval of a handler's
work instead of running on until the task's timeout.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from broker import HELD_IN_HEARTBEAT, AgentAnnounced, AgentHeartbeat, BusError

if TYPE_CHECKING:
    from broker import CommunicationBus

    from .agent import Agent
    from .attempts import Attempts

log = logging.getLogger(__name__)


def announcement(agent: Agent) -> AgentAnnounced:
    return AgentAnnounced(
        agent_id=agent.agent_id,
        capabilities=agent.capabilities,
        max_concurrent_tasks=agent.max_concurrent_tasks,
        task_types=agent.task_types,
        specialization_score=agent.specialization,
    )


def heartbeat(agent_id: str, attempts: Attempts) -> AgentHeartbeat:
    return AgentHeartbeat(
        agent_id=agent_id,
        running=attempts.running,
        holding=attempts.unended(HELD_IN_HEARTBEAT),
    )


async def beat(agent_id: str, interval: float, bus: CommunicationBus, attempts: Attempts) -> None:
    """Heartbeat every ``interval`` seconds until cancelled; a lost link costs
    the beats it spans (a warning each), not the loop."""
    while True:
        await asyncio.sleep(interval)
        try:
            await bus.publish_event(heartbeat(agent_id, attempts))
        except BusError as exc:
            log.warning("agent %s: heartbeat not sent: %s", agent_id, exc)
