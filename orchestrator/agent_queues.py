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

An agent's queue that cannot be opened (a broker blip, a channel error) is
opened again by the watch (``retry``, a bounded number per round), so its
agent's results are read once the broker lets us, not only by the next
leader. An agent removed and registered again while its old queue is still
being closed keeps that queue (and what waits in it): the queue is consumed
again once the old consumer is closed, rather than the registration waiting
for that close under the events lock (which the old consumer, holding an
event of its backlog, waits for: every event was held up for ``CLOSE_WAIT``).

Opening a queue is a few broker round trips. Taking the lead opens every
known agent's queue ``OPENED_AT_ONCE`` at a time (thousands of agents, one
after another, held the announcements back that long); so do the watch's
retries. An announcement (handled under the events lock) of an agent whose
queue exists already (a known agent: the leader that registered it declared
it) does not open it under that lock: it is opened in the background, with
the same bound. Only a new agent's queue is opened before the announcement's
handling goes on, as its agent must not hear of a task queue before its
results have a queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from broker import CommunicationBus, Event, Subscription
from broker.bus import BeforeAck, EventHandler

log = logging.getLogger(__name__)

REOPENED_PER_ROUND = 16
"""Agents' queues ``retry`` tries to open at most per watch round: a broker
that refuses them all costs a round a bounded number of calls."""
OPENED_AT_ONCE = 16
"""Agents' queues opened at once on taking the lead, by the watch and in the
background: many at a time, but not thousands of opens in flight at once."""


class AgentQueues:
    """The subscriptions to registered agents' events queues, by agent id."""

    def __init__(
        self, bus: CommunicationBus, handler: EventHandler, before_ack: BeforeAck | None = None
    ) -> None:
        self.bus = bus
        self._handler = handler
        self._before_ack = before_ack
        self._one_at_a_time = asyncio.Lock()
        self._wanted: dict[str, None] = {}
        """The agents whose queues are to be followed (registered while leading),
        in the order ``retry`` tries those not open."""
        self._subscriptions: dict[str, Subscription] = {}
        self._failures: dict[str, int] = {}
        """Per wanted agent id whose queue did not open: the attempts that failed."""
        self._locks: dict[str, asyncio.Lock] = {}
        """Per agent id: opening and deleting its queue do not interleave."""
        self._retiring: dict[str, asyncio.Task[None]] = {}
        """Per agent id removed, its queue being closed and deleted (``close``)."""
        self._deleting: set[str] = set()
        """Agent ids whose queue is being deleted: too late to keep it."""
        self._declared: set[str] = set()
        """Agent ids whose queue exists (known agents, and those opened here):
        announced, they need not wait for it to open."""
        self._later: dict[str, asyncio.Task[bool | None]] = {}
        """Per agent id, its queue being opened in the background (``open``)."""
        self._at_once = asyncio.Semaphore(OPENED_AT_ONCE)
        self._stopped: set[str] = set()
        """Agents whose consumer the broker had stopped at the last ``retry``."""
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

    @property
    def unopened(self) -> list[str]:
        """The agents followed whose queue is not open (nor being closed)."""
        return [
            agent_id
            for agent_id in self._wanted
            if agent_id not in self._subscriptions and agent_id not in self._retiring
        ]

    async def resume(self, agent_ids: Iterable[str]) -> None:
        """Leading now (the store loaded): follow the queues of these known agents."""
        self.following = True
        agent_ids = list(agent_ids)
        for agent_id in agent_ids:
            self._wanted[agent_id] = None
            self._declared.add(agent_id)  # (by the leader that registered it)
        await asyncio.gather(*map(self._open_bounded, agent_ids))

    async def open(self, agent_id: str) -> None:
        """Declare and consume ``agent_id``'s queue (idempotent); a failure is
        logged, the agent is registered all the same (its events wait in its
        queue if the declare went through) and ``retry`` opens it later.

        Removed a moment ago, its old queue is kept if it is still being closed
        (consumed again once closed: nothing to wait for here, where the events
        lock may be held); only a queue being deleted is waited for."""
        if not self.following:
            return
        self._wanted[agent_id] = None
        if agent_id in self._retiring:
            if agent_id not in self._deleting:
                return  # kept: ``_retire`` consumes it again
            await asyncio.shield(self._retiring[agent_id])  # (it opens it again too)
        if agent_id in self._subscriptions:
            return
        if agent_id in self._declared:  # its results wait in its queue meanwhile
            self._open_later(agent_id)
            return
        async with self._lock(agent_id):
            await self._subscribe(agent_id)

    async def retry(self, limit: int = REOPENED_PER_ROUND) -> int:
        """Open the queues of followed agents that did not open (up to ``limit``,
        ``OPENED_AT_ONCE`` at a time; those that fail again go last); how many opened.
        A queue that is consumed no more is closed first, and so opened again."""
        await self._close_stopped()
        tried = [agent_id for agent_id in self.unopened if agent_id not in self._later][:limit]
        results = await asyncio.gather(*map(self._open_bounded, tried))
        for agent_id, opened in zip(tried, results, strict=True):
            if opened is False and agent_id in self._wanted:
                del self._wanted[agent_id]  # to the back of the line
                self._wanted[agent_id] = None
        return sum(1 for opened in results if opened)

    async def _close_stopped(self) -> None:
        """Close the subscriptions whose consumer the broker stopped (someone
        deleted the agent's queue) and that were not consumed again since the
        last round (aio-pika 10 declares the queue again and consumes by
        itself; this is for when it could not): opening them declares the
        queue anew. The agent's events sent meanwhile reached no queue."""
        stopped = {
            agent_id
            for agent_id, subscription in list(self._subscriptions.items())
            if not await subscription.consuming()
        }
        for agent_id in stopped & self._stopped:
            async with self._lock(agent_id):
                subscription = self._subscriptions.get(agent_id)
                if subscription is None or await subscription.consuming():
                    continue
                del self._subscriptions[agent_id]
                log.warning(
                    "agent %s's events queue is consumed no more (deleted?): opening it again",
                    agent_id,
                )
                await subscription.close()
        self._stopped = stopped - self._stopped

    async def _open_bounded(self, agent_id: str) -> bool | None:
        """Open a wanted agent's queue, ``OPENED_AT_ONCE`` at a time; whether it
        opened (None: not tried, being removed)."""
        async with self._at_once, self._lock(agent_id):
            if agent_id not in self._wanted or agent_id in self._retiring:
                return None
            return await self._subscribe(agent_id)

    def _open_later(self, agent_id: str) -> None:
        if agent_id in self._later:
            return
        job = asyncio.get_running_loop().create_task(self._open_bounded(agent_id))
        self._later[agent_id] = job
        job.add_done_callback(lambda done: self._opened_later(agent_id, done))

    def _opened_later(self, agent_id: str, job: asyncio.Task[bool | None]) -> None:
        if self._later.get(agent_id) is job:
            del self._later[agent_id]
        if not job.cancelled():
            job.exception()  # (``_subscribe`` logs its failures; seen here)

    def _lock(self, agent_id: str) -> asyncio.Lock:
        return self._locks.setdefault(agent_id, asyncio.Lock())

    async def _subscribe(self, agent_id: str) -> bool:
        """Consume a wanted agent's queue, under its lock; whether it is open."""
        if agent_id in self._subscriptions:
            return True
        if not self.following or agent_id not in self._wanted:
            return False
        try:
            subscription = await self.bus.subscribe_agent_events(
                agent_id, self.on_event, before_ack=self._before_ack
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broker blip or a channel error: ``retry`` again
            failures = self._failures[agent_id] = self._failures.get(agent_id, 0) + 1
            log.log(
                logging.ERROR if failures == 1 else logging.DEBUG,
                "cannot follow agent %s's events queue (attempt %d, opened again by the watch): %s",
                agent_id,
                failures,
                exc,
            )
            return False
        if agent_id not in self._wanted or not self.following:  # removed meanwhile
            await subscription.close()
            return False
        self._subscriptions[agent_id] = subscription
        self._declared.add(agent_id)
        if failures := self._failures.pop(agent_id, 0):
            log.info(
                "following agent %s's events queue again, after %d failed attempt(s)",
                agent_id,
                failures,
            )
        return True

    def close(self, agent_id: str) -> None:
        """``agent_id`` was removed: stop consuming its queue and delete it (what
        waits there is of an agent no longer believed), unless it registers
        again meanwhile. In the background: it may be called from the handler
        of an event of that very queue."""
        self._wanted.pop(agent_id, None)
        self._failures.pop(agent_id, None)
        subscription = self._subscriptions.pop(agent_id, None)
        previous = self._retiring.get(agent_id)
        if previous is not None and previous.done():
            previous = None
        if subscription is None and (previous is not None or not self.following):
            return  # (being closed already: it is deleted unless wanted again)
        job = asyncio.get_running_loop().create_task(self._retire(agent_id, subscription, previous))
        self._retiring[agent_id] = job
        job.add_done_callback(lambda done: self._retired(agent_id, done))

    def _retired(self, agent_id: str, job: asyncio.Task[None]) -> None:
        if self._retiring.get(agent_id) is job:
            del self._retiring[agent_id]

    async def _retire(
        self,
        agent_id: str,
        subscription: Subscription | None,
        previous: asyncio.Task[None] | None,
    ) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        if subscription is not None:
            await subscription.close()
        async with self._lock(agent_id):
            if agent_id in self._wanted:
                # Registered again meanwhile: its queue is kept and consumed again
                # (a failure leaves it to ``retry``), unless removed once more.
                if await self._subscribe(agent_id) or agent_id in self._wanted:
                    return
            self._deleting.add(agent_id)  # from here on, ``open`` waits for the delete
            self._declared.discard(agent_id)
            try:
                late = self._subscriptions.pop(agent_id, None)  # opened while removed
                if late is not None:
                    await late.close()
                await self.bus.delete_agent_events(agent_id)
            except Exception as exc:
                log.warning("agent %s's events queue not deleted: %s", agent_id, exc)
            finally:
                self._deleting.discard(agent_id)

    async def stop(self) -> None:
        """No longer leading: stop consuming every queue, and keep them (the
        next leader follows them)."""
        self.following = False
        # (each ends at once, finding us no longer leading, or closes what it opened)
        await asyncio.gather(*self._later.values(), return_exceptions=True)
        subscriptions, self._subscriptions = self._subscriptions, {}
        for subscription in subscriptions.values():
            await subscription.close()
        jobs = set(self._retiring.values())
        jobs.discard(asyncio.current_task())  # type: ignore[arg-type]
        await asyncio.gather(*jobs, return_exceptions=True)
        # (after them: a queue kept for an agent registered again is not deleted)
        self._wanted.clear()
        self._failures.clear()
        self._declared.clear()
        self._stopped.clear()
        self._locks.clear()  # (every job that held one has ended)
