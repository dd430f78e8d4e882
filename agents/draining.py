"""``Drain``: how a stopping agent lets go of the attempts it holds.

A graceful stop lets the running handlers finish until the drain timeout,
stops the rest, then waits for every ended attempt to be reported and its
delivery settled, and for the async handlers it cancelled to end, before the
goodbye and before the channel closes: a channel closed first would hand a
finished task back to the queue, to run again. Every wait is bounded, as a
broker that is down makes a publish fail only after a while and a handler may
ignore its cancel; what is still unsettled then is logged, and goes back to
the queue with the channel.

Apart from ``Agent`` because it is the one policy of a stop, with its
numbers (``SETTLE_TIMEOUT``, ``SETTLE_MARGIN``), and a stop, a kill and an
``Unregister`` each take part of it.
"""

from __future__ import annotations

import asyncio
import logging

from .attempts import Attempts, StopReason
from .handlers import Runners
from .settle import Deliveries

log = logging.getLogger(__name__)

SETTLE_TIMEOUT = 15.0
"""How long a stopping agent waits, at most, for its ended tasks to be reported
and settled (and for its cancelled async handlers to end)."""
SETTLE_MARGIN = 2.0
"""``stop(drain_timeout=t)`` waits for that settling only until ``t`` (counted
from the call) plus this margin, so it returns within about ``t + SETTLE_MARGIN``
seconds, plus the time to say goodbye and close the connection."""


class Drain:
    """The waits of an agent's stop, over what it holds: attempts (their
    handlers' jobs), deliveries to settle, and handler runners."""

    def __init__(
        self, agent_id: str, attempts: Attempts, deliveries: Deliveries, runners: Runners
    ) -> None:
        self.agent_id = agent_id
        self._attempts = attempts
        self._deliveries = deliveries
        self._runners = runners

    async def stop_all(self, deadline: float) -> list[str]:
        """Let the running attempts finish until ``deadline`` (the loop's clock),
        stop the rest, and wait until ``SETTLE_MARGIN`` past it, at most, for what
        ended to be reported and settled. The ids of the tasks whose handler it
        stopped after they were acknowledged early: they are in no queue, and
        the goodbye names them for the orchestrator to publish again."""
        loop = asyncio.get_running_loop()
        jobs = self._attempts.jobs()
        if jobs:
            await asyncio.wait(jobs, timeout=max(0.0, deadline - loop.time()))
        stopped = self._attempts.stop_all(StopReason.SHUTDOWN)
        await self.wait_jobs()
        # Every ended task reported and settled before the goodbye and before the
        # channel closes (which would hand back a finished task to run again).
        await self.wait_settled(
            min(SETTLE_TIMEOUT, max(0.0, deadline - loop.time()) + SETTLE_MARGIN)
        )
        # Acknowledged early, they are in no queue: the orchestrator re-publishes them.
        return [
            a.message.task_id
            for a in stopped
            if a.detached
            and a.job is not None
            and a.job.cancelled()
            and a.stop_reason is not StopReason.CANCELLED
        ]

    async def wait_jobs(self) -> None:
        """Until every attempt's job (its run) has ended."""
        jobs = self._attempts.jobs()
        if jobs:
            await asyncio.wait(jobs)

    async def wait_settled(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Until every delivery received is settled (its task reported) and every
        async handler cancelled has ended; bounded: a broker that is down makes
        a publish fail only after a while, and a handler may ignore its cancel."""
        unsettled = self._deliveries.pending()
        handlers = self._runners.unended()
        if not unsettled and not handlers:
            return
        _, pending = await asyncio.wait([*unsettled, *handlers], timeout=timeout)
        if left := sum(1 for waiter in unsettled if waiter in pending):
            log.warning("agent %s: %d task(s) not settled before stopping", self.agent_id, left)
        if unended := sum(1 for task in handlers if task in pending):
            log.warning(
                "agent %s: %d handler(s) ignored their cancellation and still run",
                self.agent_id,
                unended,
            )
