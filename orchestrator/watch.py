"""The periodic watch: what the orchestrator notices from silence rather than events.

Each round it removes agents whose heartbeats stopped, or whose connection
the broker says is gone (``AgentRegistry.lost``; their tasks go back to the
queue), opens the events queues of agents that failed to open (after a
broker blip their results would never be read), times out running tasks
whose agent went silent past their deadline, has the outbox republish
attempts that never reached their queue, and forgets finished tasks past
their retention. While the broker link is down nobody can be heard, so
silence means nothing: the round is skipped, and once the link is back
every deadline is pushed back by the time lost.
"""

from __future__ import annotations

import asyncio
import logging

from broker import CancelTask, CommunicationBus

from .dispatch import Dispatch
from .lifecycle import Lifecycle, Move
from .models import Task, TaskStatus
from .outcomes import Outcomes
from .records import TaskRecords
from .registry import AgentRegistry
from .retention import FinishedTasks
from .settings import OrchestratorSettings
from .stats import StatsTracker
from .timeouts import RunDeadlines

log = logging.getLogger(__name__)

RETIRED_STATS = "stats.retired"
"""Store meta key: what forgotten tasks add to ``get_stats``."""


class Watch:
    def __init__(
        self,
        bus: CommunicationBus,
        settings: OrchestratorSettings,
        records: TaskRecords,
        lifecycle: Lifecycle,
        registry: AgentRegistry,
        dispatch: Dispatch,
        outcomes: Outcomes,
        stats: StatsTracker,
        finished: FinishedTasks,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.records = records
        self.clock = lifecycle.clock
        self.registry = registry
        self.dispatch = dispatch
        self.outcomes = outcomes
        self.stats = stats
        self.finished = finished
        self.deadlines = RunDeadlines()
        """Running attempts, until their timeout plus grace."""
        self._deaf_since: float | None = None
        """When the link to the broker went down (None: it is up)."""
        lifecycle.observe(self)

    def moved(self, task: Task, move: Move) -> None:
        if move.new is TaskStatus.RUNNING:
            self.deadlines.start(task.task_id, task.attempt, self.run_deadline(task))
        else:
            self.deadlines.discard(task.task_id)

    def run_deadline(self, task: Task) -> float:
        return self.clock() + task.timeout + self.settings.timeout_grace

    async def run(self) -> None:
        """Watch until cancelled, a round every ``monitor_interval``."""
        while True:
            await asyncio.sleep(self.settings.monitor_interval)
            await self.round()

    async def round(self) -> None:
        """One round; a failure is logged and the next round goes on."""
        if not self._hearing():
            return
        try:
            for agent_id, why in await self.registry.lost(self.settings.heartbeat_timeout):
                await self.remove_agent(agent_id, why)
            if self.registry.agent_queues is not None:  # those that failed to open
                await self.registry.agent_queues.retry()
            await self._check_deadlines()
            await self.dispatch.check_lost(self.outcomes.not_published)
            await self._forget_finished()
        except asyncio.CancelledError:
            raise
        except Exception:  # keep watching
            log.exception("watch round failed")

    async def remove_agent(self, agent_id: str, why: str) -> None:
        """Remove an agent that is not known to have stopped: its tasks run again."""
        agent = await self.registry.forget(agent_id, why, returned=False)
        if agent is not None:
            await self.outcomes.agent_gone(agent, returned=False, unfinished=frozenset())

    def skip_round(self) -> None:
        """A round not run because the lease is unconfirmed: until a round runs
        again, silence means nothing (deadlines are extended by that time)."""
        if self._deaf_since is None:
            self._deaf_since = self.clock()
            log.warning("lease unconfirmed: agent and task deadlines paused")

    def _hearing(self) -> bool:
        """Whether silence means anything now."""
        now = self.clock()
        if not self.bus.link_up:
            if self._deaf_since is None:
                self._deaf_since = now
                log.warning("broker link down: agent and task deadlines paused")
            return False
        if self._deaf_since is not None:
            lost, self._deaf_since = now - self._deaf_since, None
            log.info("broker link back after %.1fs: deadlines extended by as much", lost)
            self.registry.postpone(lost)
            self.deadlines.postpone(lost)
            self.dispatch.postpone(lost)
        return True

    async def _check_deadlines(self) -> None:
        for task_id, attempt in self.deadlines.expired(self.clock()):
            task = self.records.get(task_id)
            if task is None or task.status is not TaskStatus.RUNNING or task.attempt != attempt:
                continue
            agent_id = task.assigned_agent
            if agent_id:
                await self.bus.publish_control(
                    CancelTask(task_id=task_id, attempt=attempt), agent_id=agent_id
                )
            await self.outcomes.attempt_failed(
                task,
                TaskStatus.TIMEOUT,
                f"no result from agent {agent_id} within the timeout of {task.timeout:g}s"
                f" (+{self.settings.timeout_grace:g}s grace)",
                agent_id,
            )

    async def _forget_finished(self) -> None:
        """Drop the finished tasks past ``finished_task_ttl``; they go on counting."""
        forgotten = 0
        for task_id in self.finished.expired(self.clock()):
            task = self.records.get(task_id)
            if task is None or not task.status.is_final:
                continue
            self.stats.retire(task)
            await self.records.remove(task_id)
            forgotten += 1
        if forgotten:
            await self.records.store.save_meta(RETIRED_STATS, self.stats.retired)
            await self.records.flush()
            log.debug("forgot %d finished task(s)", forgotten)
