"""The agent registry: who is there, what each consumes, who is still alive.

Agents register by API or by announcing themselves; either way they go
through ``register``, which tells the agent which capability queues to
consume (and, on an announcement, which queued tasks were cancelled: a
restarted process knows nothing of what its predecessor heard). Liveness is
the heartbeats, checked against the broker's word (``lost``): an agent that
missed two of its heartbeats is asked about at the broker, and one whose
control queue is gone (its connection died: a SIGKILL, a crash) is removed at
once; one silent past ``heartbeat_timeout`` is removed too, unless its
connection lives while a flood of refused messages is on (its heartbeats may
be waiting, or dropped, behind it). When and how the broker is asked is
``orchestrator.agent_probe``. An agent's load is kept from the lifecycle's
moves, never by hand.

Identity: an agent id is bound to the broker user of its first
announcement, kept in the store's meta so that a restart keeps it; messages
claiming it from another user are refused, and those of an agent registered
by API are believed once it announced itself (``orchestrator.events``). A
binding outlives the agent's removal (a restarted process of the same user
comes back), until ``unbind``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable

from broker import DIGEST_PREFIX, CommunicationBus, ConsumeQueues, Reannounce, Unregister
from broker.messages import CancelTasks

from .agent_probe import AgentProbe
from .agent_queues import AgentQueues
from .dispatch import Queues
from .lifecycle import Lifecycle, Move, held
from .models import AgentCapability, Task, TaskStatus
from .placement import PlacementPolicy, QueueSpec, can_run, missing, wire_priorities
from .refusals import RateLimit, Refusals
from .store import StateStore

log = logging.getLogger(__name__)

_HELD = (TaskStatus.ASSIGNED, TaskStatus.RUNNING)

CANCELLED_IN_QUEUE_KEEP = 10_000
"""At most this many cancelled-in-queue ids are kept, and sent to a newly registered agent."""
AGENT_USERS = "registry.agent_users"
"""Store meta key: the broker user each agent id is bound to."""
AGENT_USERS_KEEP = 10_000
"""Bindings kept of agent ids not registered now (oldest dropped first)."""
MAX_AGENTS_PER_USER = 5000
"""Agent ids one broker user may have bound: a stranger's flood of valid
announcements of new ids registers no more than this."""

CANCELLED_PER_MESSAGE = 1000
"""Ids per ``CancelTasks`` sent to a new agent (and at most half the bus's message limit)."""
BEATS_PER_TIMEOUT = 3
"""Heartbeats an agent is told to send per ``heartbeat_timeout``: two can be late
or lost before it is taken for silent."""


class AgentRegistry:
    def __init__(
        self,
        bus: CommunicationBus,
        store: StateStore,
        lifecycle: Lifecycle,
        placement: PlacementPolicy,
        queues: Queues,
        agent_queues: AgentQueues,
        heartbeat_timeout: float | None = None,
    ) -> None:
        self.bus = bus
        self.beat_every = (
            None if heartbeat_timeout is None else heartbeat_timeout / BEATS_PER_TIMEOUT
        )
        """The heartbeat interval agents are told to keep at most (``ConsumeQueues``)."""
        self.store = store
        self.clock = lifecycle.clock
        self.placement = placement
        self.queues = queues
        self.agent_queues = agent_queues
        """Each agent's own events queue, followed while it is registered."""
        self._agents: dict[str, AgentCapability] = {}
        self._unrunnable: dict[str, QueueSpec] = {}
        """Queues warned of as no registered agent can run their tasks."""
        self._runnable: set[str] = set()
        """Queues some registered agent can run, as last found (a submit looks
        here, not at every agent); forgotten whenever an agent changes or goes."""
        self.refusals = Refusals()
        """Messages refused as untrusted, by reason (``orchestrator.events``)."""
        self._reannounces = RateLimit()
        """Answers to heartbeats of unknown ids: never one per message of a flood."""
        self._users: dict[str, str] = {}
        """The broker user each agent id is bound to (oldest first)."""
        self._per_user: Counter[str] = Counter()
        """How many agent ids each user has bound."""
        self._beats: dict[str, tuple[float, float | None]] = {}
        """Per agent heard from: its last heartbeat (or announcement) and the
        interval between its heartbeats as seen here (None until two came)."""
        self.probe = AgentProbe(bus)
        """Whether the broker says an agent's connection lives (``lost``)."""
        self._cancelled_in_queue: dict[str, None] = {}
        """Cancelled while their message waited in a queue: agents must skip them.
        New agents are told before they consume; an agent's skip report clears one."""
        self._told: dict[str, dict[str, int]] = {}
        """Per agent, the consumer priority of each queue it was last told to consume."""
        self._announced: dict[str, frozenset[str]] = {}
        """Per agent that announced itself, the capabilities it announced."""
        lifecycle.observe(self)

    def get(self, agent_id: str | None) -> AgentCapability | None:
        return self._agents.get(agent_id) if agent_id else None

    def __iter__(self):
        return iter(list(self._agents.values()))

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._agents

    async def load(self, tasks: Iterable[Task]) -> None:
        """The stored agents, after a restart, each with a fresh heartbeat
        window (nobody could be heard while no orchestrator ran) and its load
        recounted from the tasks it runs."""
        self._users = dict(await self.store.get_meta(AGENT_USERS) or {})
        self._per_user = Counter(self._users.values())
        now = self.clock()
        for agent in await self.store.agents():
            if agent.last_seen is not None:
                agent.last_seen = now
                self._beats[agent.agent_id] = (now, None)  # heard before: asked about too
            agent.running.clear()
            self._agents[agent.agent_id] = agent
        for task in tasks:
            agent = self.get(task.assigned_agent)
            if held(task) and agent is not None:
                agent.running.add(task.task_id)
        for agent in self._agents.values():
            agent.current_load = len(agent.running)

    # ------------------------------------------------------------------ load
    def moved(self, task: Task, move: Move) -> None:
        """An agent's load is the tasks it holds, started or not (its prefetch)."""
        if move.old in _HELD and move.old_agent != (move.agent if move.new in _HELD else None):
            self.release_slot(task.task_id, move.old_agent)
        if move.new in _HELD:
            agent = self.get(move.agent)
            if agent is not None:
                agent.running.add(task.task_id)
                agent.current_load = len(agent.running)
                agent.last_seen = self.clock()

    def release_slot(self, task_id: str, agent_id: str | None) -> None:
        agent = self.get(agent_id)
        if agent is not None and task_id in agent.running:
            agent.running.discard(task_id)
            agent.current_load = len(agent.running)

    # ----------------------------------------------------------- registering
    async def register(
        self,
        agent_id: str,
        capabilities: list[str],
        max_concurrent_tasks: int,
        *,
        announced: bool = False,
        specialization: dict[str, float] | None = None,
        task_types: list[str] | None = None,
    ) -> None:
        """The one path by which agents are registered: by API and by announcement.

        ``announced``: the agent announced itself (it was heard: ``last_seen``),
        with the ``task_types`` it has handlers for.
        An agent hears the cancelled-in-queue ids if it is unknown (or new
        again since it left or was removed), and on every announcement:
        ``AgentAnnounced`` carries nothing that tells a new process from an old
        one answering ``Reannounce``. Announcements are rare (a process start,
        an orchestrator start, a heartbeat from an unknown agent).
        """
        agent = self._agents.get(agent_id)
        if announced:
            self._announced[agent_id] = frozenset(capabilities)
        elif agent is not None and agent_id in self._announced:
            # A live agent refuses queues it lacks capabilities for (agents.trust):
            # the registry would say it runs tasks that stay queued for ever.
            if lacks := sorted(set(capabilities) - self._announced[agent_id]):
                raise ValueError(
                    f"capabilities: agent {agent_id!r} announced"
                    f" {sorted(self._announced[agent_id])} and cannot take on {lacks};"
                    " restart it with them"
                )
        replay = agent is None or announced
        if agent is None:
            agent = AgentCapability(
                agent_id, capabilities, max_concurrent_tasks=max_concurrent_tasks
            )
            self._agents[agent_id] = agent
            log.info("agent %s registered with %s", agent_id, capabilities)
        else:
            agent.capabilities = capabilities
            agent.max_concurrent_tasks = max_concurrent_tasks
        if specialization:
            agent.specialization_score.update(specialization)
        if announced:
            agent.last_seen = self.clock()
            self._beats[agent_id] = (agent.last_seen, self._beats.get(agent_id, (0.0, None))[1])
            agent.task_types = sorted(set(task_types or []))
        elif agent.last_seen is None:
            # Registered by API and never heard from: it has one heartbeat timeout
            # to announce itself, or it is removed (and leaves the utilisation).
            agent.last_seen = self.clock()
        await self.store.save_agent(agent)
        self._runnable.clear()  # its capabilities or types may have shrunk
        for key, spec in list(self._unrunnable.items()):
            if can_run(agent, spec):
                del self._unrunnable[key]
                log.info("agent %s can run the tasks waiting in queue %s", agent_id, key)
        await self.agent_queues.open(agent_id)  # before it consumes: its results have a queue
        await self.send_queues(agent, replay=replay)

    def warn_if_unrunnable(self, key: str, spec: QueueSpec) -> None:
        """Log once (until an agent that can run them registers) that tasks wait
        in queue ``key`` for an agent nobody registered, naming what is missing."""
        if key in self._unrunnable or key in self._runnable:
            return
        why = missing(self._agents.values(), spec)
        if why is None:
            self._runnable.add(key)
            return
        self._unrunnable[key] = spec
        log.warning("tasks of queue %s wait for a capable agent: %s", key, why)

    async def send_queues(self, agent: AgentCapability, *, replay: bool = False) -> None:
        """Tell an agent which queues to consume (those in use, and those being
        declared); with ``replay`` it first hears which queued tasks were
        cancelled, before it consumes anything, oldest first, in chunks well
        under the bus's size limit."""
        known = self.queues.known()
        keys = self.placement.queues_for(agent, known)
        default, priorities = wire_priorities(
            keys,
            self.placement.consumer_priorities(agent, {k: known[k] for k in keys}),
            self.placement.consumer_priority(agent),
        )
        if replay and self._cancelled_in_queue:
            budget = self.bus.settings.max_message_bytes // 2
            chunk: list[str] = []
            size = 0
            for task_id in list(self._cancelled_in_queue):
                entry = len(json.dumps(task_id)) + 1
                if chunk and (len(chunk) >= CANCELLED_PER_MESSAGE or size + entry > budget):
                    await self.bus.publish_control(
                        CancelTasks(task_ids=chunk), agent_id=agent.agent_id
                    )
                    chunk, size = [], 0
                chunk.append(task_id)
                size += entry
            await self.bus.publish_control(CancelTasks(task_ids=chunk), agent_id=agent.agent_id)
        await self.bus.publish_control(
            ConsumeQueues(
                queue_keys=keys,
                consumer_priority=default,
                priorities=priorities,
                # register_agent may change a live agent's limit: it adopts it as its prefetch
                max_concurrent_tasks=agent.max_concurrent_tasks,
                heartbeat_interval=self.beat_every,
                digests={
                    k: list(known[k].capabilities)
                    for k in keys
                    if k.rpartition(".")[2].startswith(DIGEST_PREFIX)
                },
            ),
            agent_id=agent.agent_id,
        )
        self._told[agent.agent_id] = {k: priorities.get(k, default) for k in keys}

    def told(self, agent_id: str) -> dict[str, int] | None:
        """The queues an agent was last told to consume, each with its consumer
        priority; None before it was told (its registration is not through)."""
        told = self._told.get(agent_id)
        return None if told is None else dict(told)

    async def tell_new_queue(self, spec: QueueSpec) -> None:
        """Tell every agent that can run the tasks of a (new) queue to consume
        it, including agents that register while the others are told."""
        told: set[str] = set()
        while True:
            untold = [
                a for a in self._agents.values() if a.agent_id not in told and can_run(a, spec)
            ]
            if not untold:
                return
            for agent in untold:
                await self.send_queues(agent)
                told.add(agent.agent_id)

    async def scored(self, agent_id: str | None, task: Task, success: bool) -> None:
        """An agent's attempt ended: its scores move, and it hears its new
        priorities if that changed any of the queues it consumes."""
        agent = self.get(agent_id)
        if agent is None:
            return
        consumed = {}
        for key in self._told.get(agent.agent_id, ()):
            spec = self.queues.in_use.get(key) or self.queues.declaring.get(key)
            if spec is not None:
                consumed[key] = spec
        if self.placement.record_outcome(agent, task, success, consumed):
            await self.send_queues(agent)

    # -------------------------------------------------------------- removing
    async def forget(self, agent_id: str, why: str, *, returned: bool) -> AgentCapability | None:
        """Remove an agent; the removed record (its running tasks are the
        caller's to put back), or None if it was not registered.

        Unless it ``returned`` its deliveries itself (a graceful stop), it is
        told to drop what it holds and stop, in case it still runs.
        """
        agent = self._agents.pop(agent_id, None)
        self._told.pop(agent_id, None)
        self._announced.pop(agent_id, None)
        self._beats.pop(agent_id, None)
        self.probe.forget(agent_id)
        if agent is None:
            return None
        self.agent_queues.close(agent_id)
        self._runnable.clear()
        log.log(
            logging.INFO if returned else logging.WARNING,
            "agent %s removed (%s) with %d running task(s)",
            agent_id,
            why,
            len(agent.running),
        )
        await self.store.delete_agent(agent_id)
        if not returned:
            await self.bus.publish_control(Unregister(agent_id=agent_id), agent_id=agent_id)
        return agent

    # -------------------------------------------------------------- identity
    def user_of(self, agent_id: str) -> str | None:
        """The broker user ``agent_id`` is bound to; None if it is bound to none yet."""
        return self._users.get(agent_id)

    def may_bind(self, user: str) -> bool:
        """Whether ``user`` may have one more agent id (``MAX_AGENTS_PER_USER``)."""
        return self._per_user[user] < MAX_AGENTS_PER_USER

    async def bind(self, agent_id: str, user: str) -> None:
        """Bind an unbound agent id to ``user`` (that of its first announcement)."""
        if agent_id in self._users:
            return
        self._users[agent_id] = user
        self._per_user[user] += 1
        if len(self._users) > AGENT_USERS_KEEP + len(self._agents):
            for old in [a for a in self._users if a not in self._agents][: len(self._users) // 10]:
                self._per_user[self._users.pop(old)] -= 1
        log.info("agent id %s is bound to broker user %r", agent_id, user)
        await self.store.save_meta(AGENT_USERS, self._users)

    async def unbind(self, agent_id: str) -> None:
        """Free ``agent_id`` for another user (an operator unregistered it)."""
        user = self._users.pop(agent_id, None)
        if user is not None:
            self._per_user[user] -= 1
            await self.store.save_meta(AGENT_USERS, self._users)

    async def ask_to_announce(self, agent_id: str) -> None:
        """Ask an agent we do not know (or not as announced) to announce itself:
        at most once per ``RateLimit.per_key`` and a few per second in all, so
        that a flood of heartbeats is never answered in kind."""
        if self._reannounces.allow(agent_id):
            await self.bus.publish_control(Reannounce(), agent_id=agent_id)

    # -------------------------------------------------------------- liveness
    async def heard(self, agent_id: str) -> None:
        """A heartbeat: an unknown agent is asked to announce itself; a known
        one's interval is learnt (smoothed: heartbeats bunched behind a flood
        move it slowly)."""
        agent = self._agents.get(agent_id)
        if agent is None:
            await self.ask_to_announce(agent_id)
            return
        now = agent.last_seen = self.clock()
        self.probe.heard(agent_id)
        last, interval = self._beats.get(agent_id, (None, None))
        if last is not None and now > last:
            gap = now - last
            interval = gap if interval is None else 0.7 * interval + 0.3 * gap
        self._beats[agent_id] = (now, interval)

    def heartbeat_interval(self, agent_id: str) -> float | None:
        """The interval seen between ``agent_id``'s heartbeats; None until two came."""
        return self._beats.get(agent_id, (0.0, None))[1]

    def suspect(self, agent_id: str) -> None:
        """A task ``agent_id`` holds came back to another agent: the broker gives
        a delivery back when its channel or connection closes, so the holder may
        be dead though its last heartbeat is recent: it is asked about at the
        broker from the next round on (``AgentProbe.suspect``)."""
        if agent_id in self._agents:
            self.probe.suspect(agent_id)

    async def lost(self, timeout: float) -> list[tuple[str, str]]:
        """The agents to remove now, each with why.

        An agent heard from that missed ``MISSED_BEATS`` heartbeats (a third of
        ``timeout`` until its interval is known) is asked about at the broker
        (``AgentProbe.ask``), at most once per interval: if
        its control queue is gone, and still gone ``GONE_GRACE`` later (asked
        every round meanwhile: a reconnecting agent declares it again), its
        connection died and the broker already gave its unacknowledged tasks
        back, so it is removed then, flood or not. Silent past ``timeout`` it
        is removed too, unless a flood of refused messages is on and its
        connection lives (or the broker cannot say): then its heartbeats may be
        waiting, or dropped, behind the flood. A ``suspect`` is asked about at once.
        """
        now = self.clock()
        found: list[tuple[str, str]] = []
        self.probe.new_round()
        flooded: bool | None = None
        for agent in list(self._agents.values()):
            if agent.last_seen is None:
                continue
            silence = now - agent.last_seen
            connected = await self.probe.ask(
                agent.agent_id,
                beat=self._beats.get(agent.agent_id),
                silence=silence,
                timeout=timeout,
                now=now,
            )
            if connected is False and self.probe.gone_for_grace(agent.agent_id, now):
                found.append(
                    (
                        agent.agent_id,
                        f"connection gone: the broker deleted its control queue"
                        f" ({silence:.1f}s silent)",
                    )
                )
                continue
            if silence < timeout:
                continue
            if flooded is None:
                flooded = self.refusals.flooded()
            if flooded and connected is not False:
                continue
            found.append((agent.agent_id, "missed heartbeats"))
        return found

    def postpone(self, seconds: float) -> None:
        """Nobody could be heard for ``seconds``: every agent gets as long (and
        what the broker said of their connections before is forgotten)."""
        self.probe.postpone()
        now = self.clock()
        for agent in self._agents.values():
            if agent.last_seen is not None:
                agent.last_seen = max(agent.last_seen + seconds, now)

    # ---------------------------------------------------- cancelled in queue
    def cancelled_in_queue(self, task_id: str) -> None:
        """Remember that agents must skip ``task_id``'s queued message."""
        self._cancelled_in_queue[task_id] = None
        if len(self._cancelled_in_queue) > CANCELLED_IN_QUEUE_KEEP:
            # Only the newest are ever sent; agents skip an older one by its attempt
            # fence (its TaskStarted is answered with a CancelTask).
            del self._cancelled_in_queue[next(iter(self._cancelled_in_queue))]

    def skipped(self, task_id: str) -> None:
        """An agent reported it skipped ``task_id``'s message: nobody needs telling."""
        self._cancelled_in_queue.pop(task_id, None)
