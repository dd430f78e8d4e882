"""What an agent tells the orchestrator besides its tasks: who it is, and that
it still lives.

The announcement carries what ``register_agent`` would be given; it is sent
again after a lost link. Each heartbeat also lists the attempts whose handlers run here: commands are
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


async def beat(agent: Agent, bus: CommunicationBus, attempts: Attempts) -> None:
    """Heartbeat every ``heartbeat_interval`` seconds until cancelled; a lost
    link costs the beats it spans (a warning each), not the loop.

    After the link came back (``bus.links`` grew) the agent first announces
    itself again: a ``ConsumeQueues`` sent while its control queue was being
    declared again was lost (a task queue declared meanwhile, for a task
    accepted during the outage, would otherwise never be consumed here), and
    the orchestrator answers every announcement with all the queues to consume."""
    links = bus.links
    while True:
        await asyncio.sleep(agent.heartbeat_interval)
        try:
            if bus.links != links:
                log.info("agent %s: link back: announcing itself again", agent.agent_id)
                # Not published again while refused (publishing.publish_event):
                # that would hold the heartbeats up; the next beat tries again.
                await bus.publish_event(announcement(agent))
                links = bus.links
            await bus.publish_event(heartbeat(agent.agent_id, attempts))
        except BusError as exc:
            log.warning("agent %s: heartbeat not sent: %s", agent.agent_id, exc)
