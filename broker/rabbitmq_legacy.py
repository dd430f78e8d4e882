"""Retiring the events queue of earlier versions, ``<p>.orchestrator.events``.

Before each agent had an events queue of its own (``Topology.agent_events``)
every event went to that one queue, bound with ``task.#`` and ``agent.#``.
After an upgrade nobody would read it and, still bound, it would grow
without end: the orchestrator unbinds it when it takes the lead, handles
what waited in it (results sent before the upgrade), and deletes it once it
is empty (at once, or at its next start).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import aiormq

from .bus import BeforeAck, EventHandler, Subscription
from .rabbitmq_consume import close_for_good
from .rabbitmq_subscription import EVENTS_PREFETCH, events_of
from .topology import Declarations, Queue

if TYPE_CHECKING:
    from .rabbitmq import RabbitMQBus

log = logging.getLogger(__name__)

LEGACY_EVENT_KEYS = ("task.#", "agent.#", "agent.announce.#", "agent.goodbye.#")
"""What earlier versions bound ``<p>.orchestrator.events`` with."""


async def drain_legacy_events(
    bus: RabbitMQBus, handler: EventHandler, before_ack: BeforeAck | None
) -> Subscription | None:
    """Unbind the old queue (it takes nothing new), delete it if empty, else
    consume what waits in it (results sent before the upgrade); the next
    start deletes it once it is empty."""
    name, exchange = bus.topology.legacy_events_queue, bus.topology.events_exchange
    channel = await bus._require().channel(publisher_confirms=False)
    try:
        underlay = await channel.get_underlay_channel()
        declared = await underlay.queue_declare(name, passive=True)
        for key in LEGACY_EVENT_KEYS:
            await underlay.queue_unbind(name, exchange, key)
        if not declared.message_count:
            await underlay.queue_delete(name, if_empty=True)
            log.info("deleted %s, the empty events queue of an earlier version", name)
            return None
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    except aiormq.exceptions.AMQPError as exc:
        log.warning("cannot retire %s, an earlier version's events queue: %s", name, exc)
        return None
    finally:
        await close_for_good(channel, "a probe channel")
    log.warning(
        "%d events wait in %s, an earlier version's events queue: handled now,"
        " and the queue deleted at the next start",
        declared.message_count,
        name,
    )

    handle = events_of(handler)
    declarer = await bus._own_channel(prefetch=EVENTS_PREFETCH)
    queue = Declarations(queues=(Queue(name),))
    return await bus._subscribe(declarer, queue, handle, check=True, before_ack=before_ack)
