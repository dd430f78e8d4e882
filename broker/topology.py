"""Every exchange, queue and argument of the bus, named in one place.

All names hang off one prefix so that several deployments, and every test,
share a broker without seeing each other's queues. ``definitions()`` renders
the fixed part as a RabbitMQ definitions document; capability queues are
declared on first use because their names depend on the tasks submitted.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

CAPABILITY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""The safe alphabet of capability names: they become routing keys and queue names."""

AGENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

ANY_CAPABILITY_KEY = "@any"
"""Key of the queue for tasks that require nothing; '@' is outside the alphabet."""

MAX_PRIORITY = 10
"""``x-max-priority`` of task queues; RabbitMQ advises against more than ~10 levels."""

_MAX_KEY_LENGTH = 180

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

DEAD_LETTER_KEEP = 10_000
"""How many dead letters ``<p>.dead`` keeps for people to inspect (oldest dropped)."""


def retry_tier_ms(delay_seconds: float) -> int:
    """The tier (in ms) that holds a delay: the smallest at least as long."""
    delay_ms = max(1, round(delay_seconds * 1000))
    for tier in RETRY_TIERS_MS:
        if tier >= delay_ms:
            return tier
    return RETRY_TIERS_MS[-1]


def capability_key(capabilities: Iterable[str]) -> str:
    """The routing key of a capability set: sorted, de-duplicated, joined by '+'.

    Long sets are shortened to a digest so that queue names stay under
    RabbitMQ's 255-byte limit.
    """
    caps = sorted(set(capabilities))
    if not caps:
        return ANY_CAPABILITY_KEY
    key = "+".join(caps)
    if len(key) > _MAX_KEY_LENGTH:
        key = "sha1-" + hashlib.sha1(key.encode()).hexdigest()
    return key


def covers(agent_capabilities: Iterable[str], required: Iterable[str]) -> bool:
    """Whether an agent with these capabilities may run a task needing ``required``."""
    return set(required) <= set(agent_capabilities)


@dataclass(frozen=True)
class Topology:
    """The names of one deployment's exchanges and queues."""

    prefix: str = "orchestrator"

    # exchanges
    @property
    def tasks_exchange(self) -> str:
        """Direct exchange; routing key = capability key."""
        return f"{self.prefix}.tasks"

    @property
    def events_exchange(self) -> str:
        """Topic exchange of status events; routing key = the event's kind."""
        return f"{self.prefix}.events"

    @property
    def control_exchange(self) -> str:
        """Direct exchange of commands to agents; routing key = agent id or 'all'."""
        return f"{self.prefix}.control"

    @property
    def dead_exchange(self) -> str:
        return f"{self.prefix}.dead"

    # queues
    def task_queue(self, key: str) -> str:
        return f"{self.prefix}.tasks.{key}"

    @property
    def orchestrator_events_queue(self) -> str:
        """The orchestrator's durable queue of events: results wait here while it is down."""
        return f"{self.prefix}.orchestrator.events"

    def agent_control_queue(self, agent_id: str) -> str:
        return f"{self.prefix}.agent.{agent_id}"

    @property
    def rpc_queue(self) -> str:
        """Requests of other services to the orchestrator (submit, cancel, status, stats...).

        Published through the default exchange (``""``, ``amq.default`` in the
        management API) with the queue's name as routing key, so it has no
        binding of its own. Each request carries ``reply_to`` and
        ``correlation_id``; the reply goes to ``reply_to`` through the default
        exchange, with the request's correlation id.
        """
        return f"{self.prefix}.rpc"

    @staticmethod
    def rpc_queue_arguments() -> dict[str, Any]:
        return {"x-queue-type": "classic"}

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
        # No dead-letter routing key: the message keeps its own, the capability key.
        return {
            "x-message-ttl": tier_ms,
            "x-dead-letter-exchange": self.tasks_exchange,
            "x-queue-type": "classic",
        }

    @staticmethod
    def dead_queue_arguments() -> dict[str, Any]:
        return {"x-queue-type": "classic", "x-max-length": DEAD_LETTER_KEEP}

    BROADCAST_KEY = "@all"
    """Outside the agent-id alphabet, so no agent's own key can equal it."""

    @staticmethod
    def task_queue_arguments() -> dict[str, Any]:
        return {"x-max-priority": MAX_PRIORITY, "x-queue-type": "classic"}

    def definitions(self, vhost: str = "/") -> dict[str, Any]:
        """The fixed topology as a RabbitMQ definitions document (for import):
        every exchange and queue the bus declares with the same arguments, so
        that its own declares succeed against it, the retry tiers included.
        Capability queues other than ``@any`` depend on the tasks submitted."""

        def exchange(name: str, kind: str) -> dict[str, Any]:
            return {
                "name": name,
                "vhost": vhost,
                "type": kind,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }

        def queue(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
            return {
                "name": name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": arguments,
            }

        def binding(source: str, queue_name: str, key: str) -> dict[str, Any]:
            return {
                "source": source,
                "vhost": vhost,
                "destination": queue_name,
                "destination_type": "queue",
                "routing_key": key,
                "arguments": {},
            }

        any_queue = self.task_queue(ANY_CAPABILITY_KEY)
        # As RabbitMQBus declares a tier: a fanout exchange bound to a TTL queue.
        tiers = [(self.retry_exchange(t), self.retry_queue(t), t) for t in RETRY_TIERS_MS]
        return {
            "exchanges": [
                exchange(self.tasks_exchange, "direct"),
                exchange(self.events_exchange, "topic"),
                exchange(self.control_exchange, "direct"),
                exchange(self.dead_exchange, "fanout"),
                *(exchange(name, "fanout") for name, _, _ in tiers),
            ],
            "queues": [
                queue(any_queue, self.task_queue_arguments()),
                queue(self.orchestrator_events_queue, {"x-queue-type": "classic"}),
                queue(self.dead_queue, self.dead_queue_arguments()),
                queue(self.orchestrator_dead_queue, {"x-queue-type": "classic"}),
                # Bound to the default exchange by its name, like every queue.
                queue(self.rpc_queue, self.rpc_queue_arguments()),
                *(queue(name, self.retry_queue_arguments(t)) for _, name, t in tiers),
            ],
            "bindings": [
                binding(self.tasks_exchange, any_queue, ANY_CAPABILITY_KEY),
                binding(self.events_exchange, self.orchestrator_events_queue, "task.#"),
                binding(self.events_exchange, self.orchestrator_events_queue, "agent.#"),
                binding(self.dead_exchange, self.dead_queue, ""),
                binding(self.dead_exchange, self.orchestrator_dead_queue, ""),
                *(binding(source, name, "") for source, name, _ in tiers),
            ],
        }
