"""The commands an agent obeys, and how: consume these queues (at these
priorities, under this limit), proceed with or cancel an attempt, stop
(unregistered), announce again, tell what it ran (``SyncReports``).

Every command passes the agent's ``ControlGate`` first (``agents.trust``):
only the orchestrator's user, no older leader, only queues it can run.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from broker import (
    BusError,
    CancelTask,
    ConsumeQueues,
    Control,
    ProceedTask,
    Reannounce,
    SyncReports,
    TasksReported,
    Unregister,
)
from broker.envelope import current_sender
from broker.messages import CancelTasks

from .attempts import StopReason
from .publishing import publish_event

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)

SYNC_TIMEOUT = 10.0
"""How long a ``SyncReports`` may wait for this agent's reports to go out;
past it the round goes unanswered (the orchestrator's grace then applies)."""


class Commands:
    """What one agent does with each command it is sent."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    async def obey(self, command: Control) -> None:
        agent = self._agent
        bus = agent._bus
        orchestrator_user = bus.orchestrator_user if bus is not None else None
        if not agent.control_gate.from_orchestrator(
            current_sender(), orchestrator_user, command.kind
        ):
            return
        if isinstance(command, ConsumeQueues):
            if agent._consumer is not None and not agent._halted.is_set():
                keys = agent.control_gate.runnable(
                    command.queue_keys,
                    agent.capabilities,
                    agent._handlers.task_types,
                    command.digests,
                )
                if command.max_concurrent_tasks is not None:
                    await self._adopt_limit(command.max_concurrent_tasks)
                agent.beats.told(agent, command.heartbeat_interval)
                priorities = {key: command.priority_of(key) for key in keys}
                await agent._consumer.consume(keys, command.consumer_priority, priorities)
                agent._priorities = {
                    **dict.fromkeys(agent._priorities, command.consumer_priority),
                    **priorities,
                }
        elif isinstance(command, ProceedTask):
            if not agent._attempts.proceed(command.task_id, command.attempt):
                log.debug(
                    "agent %s: a go-ahead for task %s attempt %d that nothing waits for",
                    agent.agent_id,
                    command.task_id,
                    command.attempt,
                )
        elif isinstance(command, CancelTask):
            log.debug(
                "agent %s: cancel of task %s%s",
                agent.agent_id,
                command.task_id,
                "" if command.attempt is None else f" attempt {command.attempt}",
            )
            agent._attempts.cancel(command.task_id, command.attempt)
        elif isinstance(command, CancelTasks):
            for task_id in command.task_ids:
                agent._attempts.cancel(task_id, command.attempt)
        elif isinstance(command, Unregister):
            if command.agent_id != agent.agent_id:
                log.warning(
                    "agent %s: ignored an Unregister for agent %r (not this agent)",
                    agent.agent_id,
                    command.agent_id,
                )
                return
            log.warning("agent %s was unregistered by the orchestrator; stopping", agent.agent_id)
            agent._halted.set()
            agent._attempts.stop_all(StopReason.UNREGISTERED)
            agent._spawn(agent._stop_after_unregister())
        elif isinstance(command, Reannounce):
            # Not while it stops: an unregistered agent's last heartbeat, heard
            # as an unknown id's, would register it again as it goes.
            if not agent._halted.is_set():
                await agent._announce()
        elif isinstance(command, SyncReports):
            agent._spawn(self._answer_sync(command.round))

    async def _answer_sync(self, round_: int) -> None:
        """``TasksReported`` once what this agent ran is told; no answer if that
        takes long or fails (the orchestrator then waits its grace, as for an
        agent whose link is down)."""
        agent = self._agent
        try:
            async with asyncio.timeout(SYNC_TIMEOUT):
                await agent._tasks.told()
                assert agent._bus is not None
                await publish_event(
                    agent._bus, TasksReported(agent_id=agent.agent_id, round=round_)
                )
        except (TimeoutError, BusError, AssertionError) as exc:
            log.info("agent %s: reports round %d not answered: %r", agent.agent_id, round_, exc)

    async def _adopt_limit(self, limit: int) -> None:
        """The orchestrator registered this agent with another limit: run that
        many at once (the broker's prefetch too); a lower one lets running
        tasks end, and takes no new one until fewer than ``limit`` run."""
        agent = self._agent
        if limit == agent.max_concurrent_tasks:
            return
        log.info(
            "agent %s: max_concurrent_tasks %d -> %d, as registered",
            agent.agent_id,
            agent.max_concurrent_tasks,
            limit,
        )
        agent.max_concurrent_tasks = limit
        agent._attempts.slots.resize(limit)
        agent._runners.resize(limit * 2)
        assert agent._consumer is not None
        try:
            await agent._consumer.set_prefetch(limit)
        except BusError as exc:
            log.warning("agent %s: prefetch not changed: %s", agent.agent_id, exc)
