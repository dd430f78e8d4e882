"""``LeaderTerm``: what an orchestrator does from the moment it leads its prefix
until it steps down.

``leadership`` decides when a term begins (lease taken, epoch claimed) and
when it ends (lease lost, a flush fenced, ``stop``); this is what happens
then. Beginning: rebuild the state from the store (the store is the only
truth a new leader has: a previous leader's memory died with it), redeclare
the task queues, settle the tasks found pending, follow the agents' events,
heartbeats and dead letters, start the watch, and ask the agents that
outlived the previous leader to announce themselves. Ending: undo that, so a
leader that lost its lease stops acting on state that may be stale.

Apart from ``TaskOrchestrator``, which wires the parts and serves the API,
because a term is the orchestrator's one stateful episode (its subscriptions,
its watch task) and its order matters: what the bus acknowledges must be in
the store first, and no event may start an answer once the term ends.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from broker import DeadLetter, Reannounce, Subscription

from .lifecycle import waiting_for_dependencies
from .models import Task, TaskStatus
from .retention import FinishedTasks
from .stats import StatsTracker
from .watch import RETIRED_STATS

if TYPE_CHECKING:
    from .task_orchestrator import TaskOrchestrator


class LeaderTerm:
    """What the orchestrator's parts do while it leads: ``begin`` and ``end``
    are ``Leadership.start``'s ``on_lead`` and ``on_step_down``.

    It reads the parts off the orchestrator (it is the orchestrator's term,
    and uses nearly all of them) but for the counters, which the orchestrator
    keeps to itself."""

    def __init__(
        self, orchestrator: TaskOrchestrator, stats: StatsTracker, finished: FinishedTasks
    ) -> None:
        self.orchestrator = orchestrator
        self._stats = stats
        self._finished = finished
        self._subscriptions: list[Subscription] = []
        self._monitor: asyncio.Task[None] | None = None

    async def begin(self) -> None:
        """Leading (lease and epoch held): reload the stored state, follow events."""
        o = self.orchestrator
        reloaded = await self._reload()
        await o.dispatch.redeclare()
        await o.outcomes.settle_reloaded(reloaded)
        # What the bus acknowledges must be in the store first. Each known agent's
        # own events queue (its results), then the shared one (announcements).
        await o.agent_queues.resume(agent.agent_id for agent in o.registry)
        on_event = o.agent_queues.on_event  # one event at a time, across the queues
        self._subscriptions = [
            await o.bus.subscribe_events(on_event, before_ack=o.store.flush),
            await o.bus.subscribe_heartbeats(o.events.on_event),
            await o.bus.subscribe_dead_letters(self._on_dead_letter, before_ack=o.store.flush),
        ]
        legacy = await o.bus.drain_legacy_events(on_event, before_ack=o.store.flush)
        if legacy is not None:
            self._subscriptions.append(legacy)
        self._monitor = asyncio.get_running_loop().create_task(self._watch_while_leading())
        # Agents that outlived a previous orchestrator announce themselves again.
        await o.bus.publish_control(Reannounce())

    async def _on_dead_letter(self, letter: DeadLetter) -> None:
        """Count it (``get_stats``' ``dead_letters``), then handle it."""
        self._stats.dead_lettered(letter)
        await self.orchestrator.events.on_dead_letter(letter)

    async def _watch_while_leading(self) -> None:
        """The watch's rounds (``Watch.run``), each once the lease is confirmed ours:
        a leader that was paused must not judge the silence of agents and tasks
        that a newer leader follows now (it would tell them to stop)."""
        o = self.orchestrator
        me = asyncio.current_task()
        while True:
            await asyncio.sleep(o.settings.monitor_interval)
            if not await o.leadership.confirm():
                # Unconfirmed: the lease is being taken back after a lost link
                # (stepping down cancels this loop). No round now, and the wait
                # counts as deaf time, as a link that is down does.
                o.watch.skip_round()
                continue
            await o.watch.round()
            if me is not None and me.cancelling():
                # Stepping down cancelled a round's AMQP call, which aiormq may have
                # turned into a channel error the round caught: end all the same.
                raise asyncio.CancelledError()

    async def end(self) -> None:
        """No longer leading: stop following events and watching (publishing ends with them)."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None and monitor is not asyncio.current_task():
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            await subscription.close()
        await self.orchestrator.agent_queues.stop()
        # after the subscriptions: no event starts another answer
        await self.orchestrator.events.stop()

    async def _reload(self) -> list[Task]:
        """Rebuild the state from the store; the pending tasks found, to settle once."""
        o = self.orchestrator
        tasks = await o.records.load()
        self._stats.rebuild(tasks, await o.store.get_meta(RETIRED_STATS))
        self._finished.rebuild(tasks)
        now = o.lifecycle.clock()
        pending: list[Task] = []
        for task in tasks:
            o.dispatch.queues.note(task)
            if task.status is TaskStatus.RUNNING:
                o.watch.deadlines.start(task.task_id, task.attempt, o.watch.run_deadline(task))
            o.dispatch.reloaded(task, now)
            if waiting_for_dependencies(task):
                # A dependency no longer stored was kept until no task needed it: met.
                unmet = [
                    d
                    for d in task.dependencies
                    if (dep := o.records.get(d)) is not None
                    and dep.status is not TaskStatus.COMPLETED
                ]
                if unmet:
                    o.outcomes.graph.wait(task.task_id, unmet)
                pending.append(task)
        await o.registry.load(tasks)
        return pending
