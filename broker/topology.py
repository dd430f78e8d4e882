"""Every exchange, queue and binding of the bus, as values, named in one place.

All names hang off one prefix so that several deployments, and every test,
share a broker without seeing each other's queues.

The topology is made of frozen value objects (``Exchange``, ``Queue``,
``Binding``) grouped in ``Declarations``, one group per role (a capability's
task queue, an agent's control queue, a retry tier...). The same objects
drive everything that would otherwise have to agree by hand: what the
RabbitMQ bus declares, the definitions document ``definitions()`` renders for
import, and how the in-process bus routes (``Binding.matches``). Equal
objects declare the same thing, so a bus can cache what it declared by value.
Capability queues are declared on first use because their names depend on
the tasks submitted.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .declarations import (
    _CLASSIC,
    Binding,
    Declarations,
    Exchange,
    Queue,
    _own_queue,
    combine,
)
from .declarations import topic_matches as topic_matches  # re-exported: where it always was
from .routing import (
    AGENT_ID_PATTERN,
    ANY_CAPABILITY_KEY,
)

MAX_PRIORITY = 10
"""``x-max-priority`` of task queues; RabbitMQ advises against more than ~10 levels."""

RETRY_TIERS_MS = (
    100,
    250,
    500,
    1_000,
    2_000,
    5_000,
    10_000,
    30_000,
    60_000,
    120_000,
    300_000,
    600_000,
    1_800_000,
    3_600_000,
)
"""Delay tiers of the retry queues. A delayed task waits in the smallest tier
at least as long as its delay, with its own (shorter) expiration: per-message
TTL expires only at a queue's head, so one queue per tier bounds how long a
short delay can be held up behind a longer one to the tier's width."""

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
"""RabbitMQ's pseudo-queue for replies to the channel that published a request."""

MONITOR_MAX_LENGTH = 10_000
"""Events a monitor's queue keeps; past it the oldest are dropped (``x-overflow``
``drop-head``): a monitor that stalls, or a flood, cannot fill the broker, and
what a monitor reads is the newest."""

HEARTBEATS_KEEP = 10_000
"""Heartbeats the orchestrator's heartbeat queue keeps; past it the oldest are
dropped (``x-overflow`` ``drop-head``): a heartbeat only says "alive at that
moment", so the newest are the ones worth keeping, and a flood of them can
neither fill the broker nor wait ahead of a result (those have a queue of
their own)."""

AGENT_EVENTS_KEEP = 10_000
"""Events an agent's own events queue keeps (``Topology.agent_events``); past
it the broker refuses new ones (``x-overflow`` ``reject-publish``): the
publisher's confirm is a nack, and an agent publishes its event again, with
backoff, until there is room. Nothing already queued is lost, so a flood of
one agent's id delays that agent's own events only, never another's."""

ANNOUNCEMENTS_KEEP = 10_000
"""Announcements the orchestrator's shared queue keeps
(``Topology.orchestrator_events``), with the same policy (reject-publish)."""

DEAD_LETTER_KEEP = 10_000
"""How many dead letters ``<p>.dead`` keeps for people to inspect (oldest dropped)."""


def retry_tier_ms(delay_seconds: float) -> int:
    """The tier (in ms) that holds a delay: the smallest at least as long."""
    delay_ms = max(1, round(delay_seconds * 1000))
    for tier in RETRY_TIERS_MS:
        if tier >= delay_ms:
            return tier
    return RETRY_TIERS_MS[-1]


@functools.lru_cache(maxsize=1024)
class Exchanges(NamedTuple):
    """The exchanges every deployment has, declared by the orchestrator."""

    tasks: Exchange
    """Direct; routing key = capability key."""
    events: Exchange
    """Topic; routing key = the event's kind."""
    control: Exchange
    """Direct; routing key = agent id, or ``BROADCAST_KEY``."""
    dead: Exchange
    """Fanout to the dead-letter queues."""
    requests: Exchange
    """Direct into the request queue: a client writes here, not to the default
    exchange, which would let it put messages into every queue by name."""


# --- one deployment's topology ------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """The exchanges, queues and bindings of one deployment (one prefix)."""

    prefix: str = "orchestrator"
    quorum: bool = False
    """The orchestrator's own durable queues (events, requests, its dead
    letters) as quorum queues (``BusSettings.quorum_queues``); task queues,
    retry tiers and the kept dead letters stay classic."""

    BROADCAST_KEY = "@all"
    """Outside the agent-id alphabet, so no agent's own key can equal it."""

    ORCHESTRATOR_EVENT_PATTERNS = ("agent.announce",)
    """What the orchestrator's shared events queue is bound with: what an agent
    sends before it is registered. Everything else an agent sends goes to its
    own queue (``agent_events``), heartbeats to theirs."""

    AGENT_EVENT_PATTERNS = ("task.*", "agent.goodbye")
    """The kinds an agent's own events queue takes, from that agent's id only."""

    ORCHESTRATOR_HEARTBEAT_PATTERNS = ("agent.heartbeat",)
    """What the orchestrator's bounded heartbeat queue is bound with."""

    # value objects ---------------------------------------------------------------
    @functools.cached_property
    def exchanges(self) -> Exchanges:
        p = self.prefix
        return Exchanges(
            tasks=Exchange(f"{p}.tasks", "direct"),
            events=Exchange(f"{p}.events", "topic"),
            control=Exchange(f"{p}.control", "direct"),
            dead=Exchange(f"{p}.dead", "fanout"),
            requests=Exchange(f"{p}.requests", "direct"),
        )

    def capability(self, key: str) -> Declarations:
        """The priority queue of the tasks that need exactly one capability set."""
        queue = Queue(self.task_queue(key), arguments=self.task_queue_arguments())
        return Declarations(queues=(queue,), bindings=(Binding(self.exchanges.tasks, queue, key),))

    def orchestrator_events(self) -> Declarations:
        """The orchestrator's shared, durable queue of announcements: they wait
        here while it is down. Bounded (``ANNOUNCEMENTS_KEEP``, reject-publish:
        an announcing agent publishes again); the results are not here but in
        each agent's own queue (``agent_events``)."""
        queue = self._refusing(self.orchestrator_events_queue, ANNOUNCEMENTS_KEEP)
        return self._bound_events(queue, self.ORCHESTRATOR_EVENT_PATTERNS)

    def agent_events(self, agent_id: str) -> Declarations:
        """One registered agent's durable queue of events (its task events and
        goodbye): results wait here while the orchestrator is down.

        Bound to that agent's id only (``task.*.<id>``, ``agent.goodbye.<id>``),
        and declared by the orchestrator when it registers the agent (deleted
        when it removes it), so that the task events of an id nobody
        registered reach no queue (the broker drops them), and a flood of one
        registered id fills that id's queue alone. Bounded: past
        ``AGENT_EVENTS_KEEP`` the broker refuses new events (reject-publish:
        the agent's publish is nacked and it publishes again with backoff);
        nothing already queued is lost."""
        queue = self._refusing(self.agent_events_queue(agent_id), AGENT_EVENTS_KEEP)
        keys = (self.event_key(kind, agent_id) for kind in self.AGENT_EVENT_PATTERNS)
        return self._bound(queue, self.exchanges.events, keys)

    def _refusing(self, name: str, keep: int) -> Queue:
        """One of the orchestrator's own durable queues that keeps ``keep``
        messages and then refuses publishes (reject-publish)."""
        arguments = {
            **_own_queue(self.quorum),
            "x-max-length": keep,
            "x-overflow": "reject-publish",
        }
        return Queue(name, arguments=arguments)

    def orchestrator_heartbeats(self) -> Declarations:
        """The orchestrator's queue of heartbeats, beside the events queue: a
        flood of heartbeats cannot delay a result, and a backlog of results
        cannot starve liveness. Bounded (``HEARTBEATS_KEEP``, drop-head).
        Durable like the rest of the fixed topology (agents check it passively,
        and a definitions import holds it), though what it carries is transient."""
        queue = Queue(
            self.orchestrator_heartbeats_queue, arguments=self.heartbeat_queue_arguments()
        )
        return self._bound_events(queue, self.ORCHESTRATOR_HEARTBEAT_PATTERNS)

    def monitor(self, patterns: Sequence[str], suffix: str) -> Declarations:
        """A monitor's private queue of the events matching ``patterns``: it
        lives as long as its one consumer."""
        queue = Queue(
            f"{self.prefix}.monitor.{suffix}",
            durable=False,
            exclusive=True,
            auto_delete=True,
            arguments=self.monitor_queue_arguments(),
        )
        return self._bound_events(queue, patterns)

    @staticmethod
    def event_key(kind: str, agent_id: str) -> str:
        """The routing key of an event on the events exchange: ``<kind>.<agent id>``
        (``task.finished.agent-7``). The sender's id is in the key so that
        RabbitMQ's topic permissions can hold an agent's user to its own id
        (``broker.permissions``); a kind is always two words."""
        return f"{kind}.{agent_id}"

    @staticmethod
    def event_binding_key(pattern: str) -> str:
        """The binding key of an events pattern written against kinds (``task.finished``,
        ``task.*``, ``agent.#``): it matches ``event_key`` of those kinds from any
        agent, and still the bare kind (``#`` matches zero words), which is what
        the in-process bus routes by."""
        return pattern if pattern == "#" or pattern.endswith(".#") else f"{pattern}.#"

    def _bound_events(self, queue: Queue, patterns: Iterable[str]) -> Declarations:
        keys = dict.fromkeys(self.event_binding_key(p) for p in patterns)
        return self._bound(queue, self.exchanges.events, keys)

    def agent_control(self, agent_id: str) -> Declarations:
        """One agent's commands: those sent to it and those sent to all.

        Exclusive: only the connection that declared it can consume it, so a
        second live agent of one id is refused (RESOURCE_LOCKED) rather than
        sharing the first one's record; it goes with that connection."""
        queue = Queue(
            self.agent_control_queue(agent_id), durable=False, exclusive=True, auto_delete=True
        )
        return self._bound(queue, self.exchanges.control, (agent_id, self.BROADCAST_KEY))

    def control_key(self, agent_id: str | None) -> str:
        """The routing key of a command to one agent, or to all when ``agent_id`` is None."""
        return agent_id or self.BROADCAST_KEY

    def kept_dead_letters(self) -> Declarations:
        """Dead letters kept for people (the management UI), newest ``DEAD_LETTER_KEEP``."""
        queue = Queue(self.dead_queue, arguments=self.dead_queue_arguments())
        return self._bound(queue, self.exchanges.dead, ("",))

    def orchestrator_dead_letters(self) -> Declarations:
        """The orchestrator's copy of every dead letter: it fails the task named in it."""
        queue = Queue(self.orchestrator_dead_queue, arguments=_own_queue(self.quorum))
        return self._bound(queue, self.exchanges.dead, ("",))

    def leader_lease(self) -> Declarations:
        """The orchestrators' lease: whoever holds this queue leads the prefix.

        Exclusive, so RabbitMQ refuses it to every other connection
        (RESOURCE_LOCKED) and deletes it the moment its holder's connection
        ends (a killed process included): the next orchestrator's declare
        then succeeds. It carries no messages."""
        return Declarations(queues=(Queue(self.leader_queue, durable=False, exclusive=True),))

    def rpc(self) -> Declarations:
        """The request queue, bound to the requests exchange by its own name."""
        queue = Queue(self.rpc_queue, arguments=self.rpc_queue_arguments(self.quorum))
        return self._bound(queue, self.exchanges.requests, (self.rpc_queue,))

    def retry_tier(self, tier_ms: int) -> Declarations:
        """A fanout exchange into a TTL queue that dead-letters to the tasks exchange.

        No dead-letter routing key: a message keeps its own, the capability key.
        """
        exchange = Exchange(self.retry_exchange(tier_ms), "fanout")
        queue = Queue(self.retry_queue(tier_ms), arguments=self.retry_queue_arguments(tier_ms))
        return Declarations((exchange,), (queue,), (Binding(exchange, queue, ""),))

    def fixed(self) -> Declarations:
        """What a bus declares when it connects."""
        return (
            Declarations(exchanges=tuple(self.exchanges))
            + self.capability(ANY_CAPABILITY_KEY)
            + self.orchestrator_events()
            + self.orchestrator_heartbeats()
            + self.kept_dead_letters()
            + self.orchestrator_dead_letters()
        )

    def everything(
        self, queue_keys: Iterable[str] = (), agent_ids: Iterable[str] = ()
    ) -> Declarations:
        """The fixed topology, the request queue, every retry tier, the
        capability queues of ``queue_keys`` and the events queues of
        ``agent_ids``: all that a deployment can have but monitors' and
        agents' exclusive queues."""
        return (
            self.fixed()
            + self.rpc()
            + combine(self.retry_tier(t) for t in RETRY_TIERS_MS)
            + combine(self.capability(k) for k in queue_keys if k != ANY_CAPABILITY_KEY)
            + combine(self.agent_events(a) for a in dict.fromkeys(agent_ids))
        )

    @staticmethod
    def _bound(queue: Queue, exchange: Exchange, keys: Iterable[str]) -> Declarations:
        return Declarations(
            queues=(queue,), bindings=tuple(Binding(exchange, queue, k) for k in keys)
        )

    def definitions(self, vhost: str = "/", agent_ids: Iterable[str] = ()) -> dict[str, Any]:
        """The fixed topology as a RabbitMQ definitions document (for import):
        every exchange and queue the bus declares with the same arguments, so
        that its own declares succeed against it, the retry tiers included,
        and the events queues of ``agent_ids``. Capability queues other than
        ``@any`` depend on the tasks submitted, agents' events queues on who
        registers (the orchestrator declares them then). ``ValueError`` for an
        id outside ``AGENT_ID_PATTERN``."""
        agent_ids = list(agent_ids)
        for agent_id in agent_ids:
            if not AGENT_ID_PATTERN.match(agent_id):
                raise ValueError(f"{agent_id!r} is not an agent id ({AGENT_ID_PATTERN.pattern})")
        return self.everything(agent_ids=agent_ids).definitions(vhost)

    # names ---------------------------------------------------------------------
    @property
    def tasks_exchange(self) -> str:
        """Direct exchange; routing key = capability key."""
        return self.exchanges.tasks.name

    @property
    def requests_exchange(self) -> str:
        return self.exchanges.requests.name

    @property
    def events_exchange(self) -> str:
        """Topic exchange of status events; routing key = the event's kind."""
        return self.exchanges.events.name

    @property
    def control_exchange(self) -> str:
        """Direct exchange of commands to agents; routing key = agent id or 'all'."""
        return self.exchanges.control.name

    @property
    def dead_exchange(self) -> str:
        return self.exchanges.dead.name

    def task_queue(self, key: str) -> str:
        return f"{self.prefix}.tasks.{key}"

    @property
    def orchestrator_events_queue(self) -> str:
        """The orchestrator's shared queue of announcements (``orchestrator_events``).
        Not ``<p>.orchestrator.events``, the unbounded queue of every event
        before agents had queues of their own (``legacy_events_queue``): a
        queue's arguments cannot change under its name."""
        return f"{self.prefix}.orchestrator.announcements"

    def retired(self) -> Declarations:
        """What earlier versions declared and this one does not: deleted with
        the rest of a prefix (not in ``everything``, which the definitions
        document is made of)."""
        return Declarations(queues=(Queue(self.legacy_events_queue),))

    @property
    def legacy_events_queue(self) -> str:
        """The events queue of versions before agents had their own: purged with the rest."""
        return f"{self.prefix}.orchestrator.events"

    def agent_events_queue(self, agent_id: str) -> str:
        """One agent's events queue (``agent_events``)."""
        return f"{self.prefix}.orchestrator.events.{agent_id}"

    @property
    def orchestrator_heartbeats_queue(self) -> str:
        """The orchestrator's bounded queue of heartbeats (see ``orchestrator_heartbeats``)."""
        return f"{self.prefix}.orchestrator.heartbeats"

    @property
    def leader_queue(self) -> str:
        """The lease of the orchestrator that leads this prefix (see ``leader_lease``)."""
        return f"{self.prefix}.orchestrator.leader"

    def agent_control_queue(self, agent_id: str) -> str:
        return f"{self.prefix}.agent.{agent_id}"

    @property
    def rpc_queue(self) -> str:
        """Requests of other services to the orchestrator (submit, cancel, status, stats...).

        Published to the requests exchange (``requests_exchange``) with the
        queue's name as routing key. Each request carries ``reply_to`` and
        ``correlation_id``; the reply goes to ``reply_to`` through the default
        exchange, with the request's correlation id.
        """
        return f"{self.prefix}.rpc"

    @staticmethod
    def rpc_queue_arguments(quorum: bool = False) -> dict[str, Any]:
        return _own_queue(quorum)

    @property
    def dead_queue(self) -> str:
        """Dead letters kept for people (the management UI), newest ``DEAD_LETTER_KEEP``."""
        return f"{self.prefix}.dead"

    @property
    def orchestrator_dead_queue(self) -> str:
        """The orchestrator's copy of every dead letter: it fails the task named in it."""
        return f"{self.prefix}.orchestrator.dead"

    def retry_exchange(self, tier_ms: int) -> str:
        return f"{self.prefix}.retry.{tier_ms}"

    def retry_queue(self, tier_ms: int) -> str:
        return f"{self.prefix}.retry.{tier_ms}"

    def retry_queue_arguments(self, tier_ms: int) -> dict[str, Any]:
        return {
            "x-message-ttl": tier_ms,
            "x-dead-letter-exchange": self.tasks_exchange,
            **_CLASSIC,
        }

    @staticmethod
    def monitor_queue_arguments() -> dict[str, Any]:
        return {"x-max-length": MONITOR_MAX_LENGTH, "x-overflow": "drop-head"}

    @staticmethod
    def heartbeat_queue_arguments() -> dict[str, Any]:
        return {**_CLASSIC, "x-max-length": HEARTBEATS_KEEP, "x-overflow": "drop-head"}

    @staticmethod
    def dead_queue_arguments() -> dict[str, Any]:
        return {**_CLASSIC, "x-max-length": DEAD_LETTER_KEEP}

    @staticmethod
    def task_queue_arguments() -> dict[str, Any]:
        return {"x-max-priority": MAX_PRIORITY, **_CLASSIC}
