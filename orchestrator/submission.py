"""A submitted task's first publish: within a bound, and withdrawn only when certainly unsent.

A submit must answer in bounded time even while the broker is gone, and it
must never lose a task it accepted nor leave one behind that it refused. The
rule: a task whose message certainly reached no queue (the bus never had it,
or refused it) is withdrawn and the submit raises, unless a durable store can
keep it to publish later (a broker that is down or too slow is no reason to
lose it); one whose message may have been routed (a confirm lost, the
connection lost after sending, no answer in time) is accepted and watched,
since withdrawing it could leave it running unknown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from broker import BusConnectionError

from .bounds import Bounds
from .dispatch import Dispatch
from .models import Task

log = logging.getLogger(__name__)


def _why(exc: BaseException, bound: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"the broker did not take the task within submit_timeout={bound:g}s"
    return str(exc) or type(exc).__name__


class Submission:
    def __init__(self, dispatch: Dispatch) -> None:
        self.dispatch = dispatch
        self.bus = dispatch.bus
        self.records = dispatch.records
        self.clock = dispatch.lifecycle.clock
        self._bounds = Bounds()

    async def publish(self, task: Task, bound: float, forget: Callable[[Task], None]) -> None:
        """Publish a new task within ``bound`` seconds, or keep or withdraw it
        (``forget`` undoes what the submit counted); raises what the caller must hear."""
        deadline = self.clock() + bound
        durable = self.records.store.durable
        if not self.bus.link_up and (durable or not await self._link_back(bound)):
            # A durable store keeps it at once; without one it waited for the link.
            why = "the broker cannot be reached" if self.bus.is_connected else "the bus is closed"
            await self._keep_or_refuse(task, why, forget)
            return
        try:
            left = max(0.01, deadline - self.clock())
            # In this task (``wait_for`` would make one per submit), under a timer
            # shared with the submits bounded within the same slot (``bounds``): on
            # time up the publish is cancelled where it waits and TimeoutError raised.
            async with self._bounds.bound(left):
                await self.dispatch.publish(task)
        except asyncio.CancelledError:
            # The caller gave up, not the bus: the task is marked queued and watched
            # (published again if it never reached its queue). Nothing is deleted.
            raise
        except Exception as exc:
            if self.dispatch.certainly_unsent(task):
                if isinstance(exc, ConnectionError | TimeoutError):
                    await self._keep_or_refuse(task, _why(exc, bound), forget, exc)
                    return
                await self._withdraw(task, forget)
                raise
            # May have been routed: an agent may have run it already, its events
            # still waiting to be handled. Published again if it never reached its
            # queue (the attempt fence makes a duplicate harmless).
            log.warning(
                "task %s: its publish failed (%s) but may have reached its queue"
                " (%s at attempt %d): accepted, and watched",
                task.task_id,
                _why(exc, bound),
                task.status.value,
                task.attempt,
            )

    async def _link_back(self, timeout: float) -> bool:
        """Whether the broker link comes back within ``timeout`` (a blip, a
        reconnect under way). A bus that was closed does not come back: no wait."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not self.bus.link_up:
            if loop.time() >= end or not self.bus.is_connected:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _keep_or_refuse(
        self,
        task: Task,
        why: str,
        forget: Callable[[Task], None],
        cause: BaseException | None = None,
    ) -> None:
        """The bus cannot take ``task`` now: a durable store keeps it, marked
        queued and watched, to be published once the link is back; otherwise it
        is withdrawn and the submit raises ``BusConnectionError`` (a
        ``ConnectionError``, the seed's error for a bus failure)."""
        if not self.records.store.durable:
            await self._withdraw(task, forget)
            message = f"{why}: the task was not accepted (no durable store to keep it)"
            raise BusConnectionError(message) from cause
        try:
            if task.attempt == 0:
                await self.dispatch.publish(task, send=False)
            await self.records.flush()
        except Exception as exc:
            await self._withdraw(task, forget)
            raise BusConnectionError(f"{why}, and the task could not be stored: {exc}") from exc
        log.warning("task %s: %s; kept in the store, published when it can be", task.task_id, why)

    async def _withdraw(self, task: Task, forget: Callable[[Task], None]) -> None:
        """Forget a task whose submission failed, as if it had never been submitted."""
        forget(task)
        await self.records.remove(task.task_id)
        try:
            await self.records.flush()
        except Exception:
            log.exception("task %s: its withdrawal is not saved yet", task.task_id)
