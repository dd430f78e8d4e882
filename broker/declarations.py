"""The value objects of a topology: exchanges, queues, bindings, and what is declared together.

Frozen and comparable, so that one object drives declaring (``broker/rabbitmq_declare.py``),
the exported definitions and the in-process bus's routing (``Binding.matches``); the names
and shapes of one deployment's objects are ``broker/topology.py``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: '*' is exactly one word, '#' zero or more words."""

    def match(p: tuple[str, ...], k: tuple[str, ...]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        if not k:
            return False
        return (p[0] == "*" or p[0] == k[0]) and match(p[1:], k[1:])

    def words(text: str) -> tuple[str, ...]:
        return tuple(text.split(".")) if text else ()  # "" has no words

    return match(words(pattern), words(key))


# --- value objects ----------------------------------------------------------------

ExchangeType = Literal["direct", "topic", "fanout"]

_CLASSIC = {"x-queue-type": "classic"}
"""Stated even where it is the default, so that a policy or a node default of
quorum queues cannot silently give us queues without priorities."""

_QUORUM = {"x-queue-type": "quorum"}
"""The orchestrator's own queues under ``quorum_queues``: replicated across a
cluster's nodes (a majority must be up). They take no priorities on RabbitMQ
3.x, which is why the task queues stay classic."""


def _own_queue(quorum: bool) -> dict[str, Any]:
    return dict(_QUORUM if quorum else _CLASSIC)


def _frozen(arguments: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(arguments))


@dataclass(frozen=True)
class Exchange:
    """An exchange as it is declared."""

    name: str
    type: ExchangeType
    durable: bool = True
    auto_delete: bool = False
    # A mapping is not hashable: equality compares the arguments, the hash does not need to.
    arguments: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "arguments", _frozen(self.arguments))

    def definition(self, vhost: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "vhost": vhost,
            "type": self.type,
            "durable": self.durable,
            "auto_delete": self.auto_delete,
            "internal": False,
            "arguments": dict(self.arguments),
        }


@dataclass(frozen=True)
class Queue:
    """A queue as it is declared; its arguments say how it behaves (priorities,
    TTL and where expired messages go, a length limit)."""

    name: str
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "arguments", _frozen(self.arguments))

    @property
    def max_priority(self) -> int | None:
        return self.arguments.get("x-max-priority")

    @property
    def max_length(self) -> int | None:
        return self.arguments.get("x-max-length")

    @property
    def message_ttl_ms(self) -> int | None:
        return self.arguments.get("x-message-ttl")

    @property
    def dead_letter_exchange(self) -> str | None:
        return self.arguments.get("x-dead-letter-exchange")

    def definition(self, vhost: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "vhost": vhost,
            "durable": self.durable,
            "auto_delete": self.auto_delete,
            "arguments": dict(self.arguments),
        }


@dataclass(frozen=True)
class Binding:
    """A queue bound to an exchange under a routing key (a pattern on a topic exchange)."""

    exchange: Exchange
    queue: Queue
    routing_key: str = ""

    def matches(self, routing_key: str) -> bool:
        """Whether a message published to ``exchange`` with ``routing_key`` reaches ``queue``."""
        if self.exchange.type == "fanout":
            return True
        if self.exchange.type == "topic":
            return topic_matches(self.routing_key, routing_key)
        return self.routing_key == routing_key

    def definition(self, vhost: str) -> dict[str, Any]:
        return {
            "source": self.exchange.name,
            "vhost": vhost,
            "destination": self.queue.name,
            "destination_type": "queue",
            "routing_key": self.routing_key,
            "arguments": {},
        }


@dataclass(frozen=True)
class Declarations:
    """What to declare together: exchanges first, then queues, then bindings.

    A binding names its exchange without declaring it: whoever declares a
    capability or control queue binds it to an exchange the orchestrator
    declared, and needs no right to configure that exchange.
    """

    exchanges: tuple[Exchange, ...] = ()
    queues: tuple[Queue, ...] = ()
    bindings: tuple[Binding, ...] = ()

    def __add__(self, other: Declarations) -> Declarations:
        return Declarations(
            self.exchanges + other.exchanges,
            self.queues + other.queues,
            self.bindings + other.bindings,
        )

    @property
    def queue(self) -> Queue:
        """The queue of a group that declares exactly one."""
        (queue,) = self.queues
        return queue

    def definitions(self, vhost: str = "/") -> dict[str, Any]:
        """As the sections of a RabbitMQ definitions document."""
        return {
            "exchanges": [e.definition(vhost) for e in self.exchanges],
            "queues": [q.definition(vhost) for q in self.queues],
            "bindings": [b.definition(vhost) for b in self.bindings],
        }


def combine(groups: Iterable[Declarations]) -> Declarations:
    total = Declarations()
    for group in groups:
        total += group
    return total
