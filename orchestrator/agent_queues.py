"""Each registered agent's own events queue, followed while it is registered.

Results used to share one durable queue with every event anyone sent, so a
backlog of bogus task events (a stranger's flood, or one published while the
orchestrator was down) waited ahead of the real results. Now an agent's task
events and goodbye go to a queue of its own (``Topology.agent_events``),
bound to its id only, which the orchestrator declares and consumes when it
registers the agent (before the agent hears of any queue to consume, so that
no result of it finds no queue), stops consuming and deletes when it removes
it, and consumes again, for every stored agent, when it starts leading. The
task events of an id nobody registered then reach no queue: the broker drops
them before anyone reads them. A flood of a registered id fills that id's
bounded queue only (reject-publish: its agent publishes again with backoff),
and the others' results go on through their own queues.

Every queue's events go through one lock with the shared queue's, so that
the handlers see one event at a time as they did with one queue (their
checks and moves assume it); the lock is fair (first come, first served),
so a flooded queue holds up another's event by one event at most, and each
event yields to the loop once handled (requests and the other queues go on).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from broker import BusError, CommunicationBus, Event, Subscription
from broker.bus import BeforeAck, EventHandler

log = logging.getLogger(__name__)


class AgentQueues:
    """The subscriptions to registered agents' events queues, by agent id."""

    def __init__(
        self, bus: CommunicationBus, handler: EventHandler, before_ack: BeforeAck | None = None
    ) -> None:
        self.bus = bus
        self._handler = handler
        self._before_ack = before_ack
        self._one_at_a_time = asyncio.Lock()
        self._subscriptions: dict[str, Subscription] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        """Per agent id: opening and deleting its queue do not interleave."""
        self._retiring: dict[str, asyncio.Task[None]] = {}
        """Per agent id removed, its queue being closed and deleted (``close``)."""
        self.following = False
        """Leading (``resume`` to ``stop``): only then does ``open`` consume."""

    async def on_event(self, event: Event) -> None:
        """The handler every events queue is consumed with (the shared one too)."""
        async with self._one_at_a_time:
            await self._handler(event)
        # A refused event is handled without a pause (nothing in it waits): yield,
        # or a backlog in one queue holds the loop (requests, the other queues)
        # until the prefetch of it is read.
        await asyncio.sleep(0)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._subscriptions

    async def resume(self, agent_ids: Iterable[str]) -> None:
        """Leading now (the store loaded): follow the queues of these known agents."""
        self.following = True
        for agent_id in agent_ids:
            await self.open(agent_id)

    async def open(self, agent_id: str) -> None:
        """Declare and consume ``agent_id``'s queue (idempotent); a failure is
        logged, the agent is registered all the same (its events wait in its
        queue if the declare went through, and the next leader follows it)."""
        if not self.following:
            return
        retiring = self._retiring.get(agent_id)
        if retiring is not None:  # removed a moment ago: its old queue goes first
            await asyncio.shield(retiring)
        async with self._locks.setdefault(agent_id, asyncio.Lock()):
            if agent_id in self._subscriptions:
                return
            try:
                self._subscriptions[agent_id] = await self.bus.subscribe_agent_events(
                    agent_id, self.on_event, before_ack=self._before_ack
                )
            except BusError as exc:
                log.error("cannot follow agent %s's events queue: %s", agent_id, exc)

    def close(self, agent_id: str) -> None:
        """``agent_id`` was removed: stop consuming its queue and delete it (what
        waits there is of an agent no longer believed). In the background: it
        may be called from the handler of an event of that very queue."""
        subscription = self._subscriptions.pop(agent_id, None)
        if subscription is None and not self.following:
            return
        job = asyncio.get_running_loop().create_task(self._retire(agent_id, subscription))
        self._retiring[agent_id] = job
        job.add_done_callback(lambda done: self._retired(agent_id, done))

    def _retired(self, agent_id: str, job: asyncio.Task[None]) -> None:
        if self._retiring.get(agent_id) is job:
            del self._retiring[agent_id]

    async def _retire(self, agent_id: str, subscription: Subscription | None) -> None:
        if subscription is not None:
            await subscription.close()
        async with self._locks.setdefault(agent_id, asyncio.Lock()):
            if agent_id in self._subscriptions:
                return  # registered again meanwhile: its queue is in use
            try:
                await self.bus.delete_agent_events(agent_id)
            except BusError as exc:
                log.warning("agent %s's events queue not deleted: %s", agent_id, exc)

    async def stop(self) -> None:
        """No longer leading: stop consuming every queue, and keep them (the
        next leader follows them)."""
        self.following = False
        subscriptions, self._subscriptions = self._subscriptions, {}
        for subscription in subscriptions.values():
            await subscription.close()
        jobs = set(self._retiring.values())
        jobs.discard(asyncio.current_task())  # type: ignore[arg-type]
        await asyncio.gather(*jobs, return_exceptions=True)
