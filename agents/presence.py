"""What an agent tells the orchestrator besides its tasks: who it is, and that
it still lives.

The announcement carries what ``register_agent`` would be given; it is sent
again after a lost link. Each heartbeat also lists the attempts whose handlers run here: commands are
fire-and-forget, and one published while the agent's control queue was being
declared again after a reconnect is lost. The orchestrator compares the list
with its records and cancels again any attempt that ended or was superseded
meanwhile, so such a loss costs at most one heartbeat interval of a handler's
work instead of running on until the task's timeout. How often it beats is
its own ``heartbeat_interval``, or shorter if the orchestrator asks (``Beats``).
"""

from __future__ import annotations

import asyncio
import contextlib
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


MIN_HEARTBEAT_INTERVAL = 0.05
"""The shortest interval an agent adopts when told one (``ConsumeQueues``)."""


class Beats:
    """How often one agent beats: its own interval, or a shorter one its
    orchestrator asks for (a third of its ``heartbeat_timeout``), so that an
    agent configured to beat every 5 s is not removed as silent by an
    orchestrator that waits 3 s."""

    def __init__(self, interval: float) -> None:
        self.own = interval
        self.sooner = asyncio.Event()
        """Set to end the wait for the next beat (a shorter interval was adopted)."""

    def told(self, agent: Agent, interval: float | None) -> None:
        if interval is None:
            return
        wanted = min(self.own, max(MIN_HEARTBEAT_INTERVAL, interval))
        if wanted != agent.heartbeat_interval:
            if wanted < agent.heartbeat_interval:
                log.info(
                    "agent %s: heartbeats every %gs, as the orchestrator expects (was %gs)",
                    agent.agent_id,
                    wanted,
                    agent.heartbeat_interval,
                )
                self.sooner.set()  # beat now, and from now on as often
            agent.heartbeat_interval = wanted


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
    sooner = agent.beats.sooner
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(agent.heartbeat_interval):
                await sooner.wait()
        sooner.clear()
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
