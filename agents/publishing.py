"""Publishing an agent's events: a refused publish is published again, with backoff.

An agent's task events and goodbye go to its own bounded events queue, and
its announcements to the orchestrator's shared one (``Topology.agent_events``,
``orchestrator_events``); a full one refuses a publish (``x-overflow``
``reject-publish``: the confirm is a nack, a ``PublishRefused``) rather than
drop what it holds. That happens when the agent's id is flooded, or the
orchestrator is down long enough for a backlog to fill it. Nothing was lost,
and the orchestrator drains the queue at thousands of events a second: so
the agent publishes the event again, backing off, for ``REFUSED_PATIENCE``
seconds, before the publish fails as any other would (a final event not
sent leaves its task to be run again). Heartbeats do not come here: theirs
is a drop-head queue, which never refuses.
"""

from __future__ import annotations

import asyncio
import logging

from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from broker import CommunicationBus, Event, PublishRefused

log = logging.getLogger(__name__)

REFUSED_PATIENCE = 60.0
"""Seconds an event refused by a full queue is published again before giving up."""
FIRST_WAIT = 0.05
"""Seconds before the first publish again: the queue that refused it was full a moment ago."""


async def publish_event(bus: CommunicationBus, event: Event) -> None:
    """``bus.publish_event``, published again while a full queue refuses it."""
    try:
        await bus.publish_event(event)  # the common case, without the retry machinery
        return
    except PublishRefused:
        pass
    await asyncio.sleep(FIRST_WAIT)  # tenacity's first attempt would go at once
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(REFUSED_PATIENCE - FIRST_WAIT),
        wait=wait_exponential(multiplier=FIRST_WAIT, max=2.0),
        retry=retry_if_exception_type(PublishRefused),
        before_sleep=before_sleep_log(log, logging.INFO),
        reraise=True,
    ):
        with attempt:
            await bus.publish_event(event)
