"""What follows when an attempt ends: a retry, or a final status and its dependents.

The event handlers, the watch, the API and the agent registry all end
attempts; they do it through ``Outcomes`` so that retries (back-off, an
avoided agent), dependents (released with their dependencies' results, or
ended because a dependency will never complete) and waiters are settled the
same way whoever ended it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from broker import BusError, MessageTooLarge

from .dependencies import DependencyGraph
from .dispatch import Dispatch
from .lifecycle import Lifecycle, Move, held, waiting_for_dependencies
from .models import FINAL_STATUSES, AgentCapability, Task, TaskStatus
from .placement import PlacementPolicy
from .records import TaskRecords
from .registry import AgentRegistry
from .retries import RetryPolicy

log = logging.getLogger(__name__)


class Outcomes:
    def __init__(
        self,
        records: TaskRecords,
        lifecycle: Lifecycle,
        dispatch: Dispatch,
        registry: AgentRegistry,
        placement: PlacementPolicy,
        retry_policy: RetryPolicy,
    ) -> None:
        self.records = records
        self.lifecycle = lifecycle
        self.dispatch = dispatch
        self.registry = registry
        self.placement = placement
        self.retry_policy = retry_policy
        self.graph = DependencyGraph()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        lifecycle.observe(self, to=FINAL_STATUSES)

    def moved(self, task: Task, move: Move) -> None:
        """Heard for final moves only: the dependency graph and the waiters let go."""
        if move.new.is_final:
            self.graph.forget(task.task_id)
            for waiter in self._waiters.pop(task.task_id, ()):
                if not waiter.done():
                    waiter.set_result(None)

    async def wait(self, task: Task, timeout: float | None) -> None:
        """Return once ``task`` is final; ``TimeoutError`` after ``timeout``.

        The waiter is this call's own future, so it is awaited bare: a timeout
        or a cancel of the caller cancels only it (``moved`` skips a done
        one), with no ``shield`` nor ``wait_for`` task around it (one of each
        per wait, before); a timer only when there is a ``timeout``."""
        if task.status.is_final:
            return
        task_id = task.task_id
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiters.get(task_id)
        if waiters is None:
            self._waiters[task_id] = [waiter]
        else:
            waiters.append(waiter)
        try:
            if timeout is None:
                await waiter
            else:
                async with asyncio.timeout(timeout):
                    await waiter
        finally:
            waiters = self._waiters.get(task_id)  # None once ``moved`` resolved them
            if waiters is not None:
                if waiter in waiters:
                    waiters.remove(waiter)
                if not waiters:
                    del self._waiters[task_id]

    # ----------------------------------------------------------------- ending
    async def finish(
        self,
        task: Task,
        status: TaskStatus,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        at: float | None = None,
        agent: str | None = None,
        cascade: bool = True,
    ) -> None:
        """Put a task in a final state and settle its dependents.

        ``cascade`` False: the caller is already walking the dependents.
        """
        self.lifecycle.transition(task, status, result=result, error=error, at=at, agent=agent)
        await self.records.save(task)
        if not cascade:
            return
        if status is TaskStatus.COMPLETED:
            ready = self.graph.completed(task.task_id)
            if ready:  # (mostly none: no coroutine made for nothing)
                await self.release(ready, f"task {task.task_id}")
            return
        for doomed_id, cause_id in self.graph.doomed(task.task_id):
            doomed, cause = self.records.get(doomed_id), self.records.get(cause_id)
            if doomed is not None and cause is not None and not doomed.status.is_final:
                await self.end_dependent(doomed, cause, cascade=False)

    async def end_dependent(self, task: Task, cause: Task, *, cascade: bool = True) -> None:
        """End a task because its dependency ``cause`` will never complete."""
        status = TaskStatus.CANCELLED if cause.status is TaskStatus.CANCELLED else TaskStatus.FAILED
        error = f"dependency {cause.task_id} ({cause.name}) ended {cause.status.value}"
        await self.finish(task, status, error=error, cascade=cascade)

    async def not_published(self, task: Task, exc: Exception) -> None:
        """A task that can never be published (too large with its dependencies' results)."""
        await self.finish(task, TaskStatus.FAILED, error=f"not published: {exc}")

    async def attempt_failed(
        self,
        task: Task,
        status: TaskStatus,
        error: str | None,
        agent_id: str | None,
        traceback: str | None = None,
    ) -> None:
        """Retry after a back-off, preferring another agent, or end the task."""
        task.traceback = traceback or task.traceback
        if task.retry_count >= task.max_retries:
            await self.finish(task, status, error=error, agent=agent_id)
            return
        task.retry_count += 1
        task.error_message = error
        delay = self.retry_policy.delay(task.retry_count)
        avoid = self.placement.avoid(task, agent_id, self.registry)
        log.info(
            "task %s attempt %d %s (%s); retry %d/%d in %.2fs",
            task.task_id,
            task.attempt,
            status.value,
            error,
            task.retry_count,
            task.max_retries,
            delay,
        )
        await self.dispatch.publish(task, delay=delay, avoid=avoid)

    # -------------------------------------------------------------- releasing
    async def release(self, ready_ids: list[str], why: str) -> None:
        """Publish the dependents whose dependencies are all met now.

        They are gone from the dependency graph, and the dependency is final
        (an event for it again changes nothing): none may be left pending. So
        once the bus fails to take one, the rest are only marked queued, and
        the outbox's watch publishes them when it can.
        """
        bus_failing = False
        for ready_id in ready_ids:
            ready = self.records.get(ready_id)
            if ready is None or not waiting_for_dependencies(ready):
                continue
            if bus_failing:
                await self.dispatch.publish(ready, send=False)
                continue
            try:
                await self.dispatch.publish(ready)
            except MessageTooLarge as exc:
                await self.not_published(ready, exc)
            except BusError as exc:
                log.warning(
                    "publishing tasks released by %s failed (%s); they are watched and"
                    " published when the bus can",
                    why,
                    exc,
                )
                bus_failing = True
            except Exception:
                # Marked queued and watched before anything could fail: the watch
                # publishes it again; the others are released as usual.
                log.exception("publishing task %s released by %s failed", ready_id, why)

    async def agent_gone(
        self, agent: AgentCapability, *, returned: bool, unfinished: frozenset[str] | set[str]
    ) -> None:
        """Put the tasks a removed agent held back in the queue: they read
        ``pending`` at once.

        ``returned``: the agent itself gave its deliveries back to the broker
        (a graceful stop), so they only change state, except ``unfinished``
        ones it had acknowledged early (long tasks). Otherwise they are
        re-published as new attempts: a silent agent may still hold them, and
        the attempt it holds is cancelled if it ever starts.
        """
        for task_id in sorted(agent.running):
            task = self.records.get(task_id)
            if task is None or not held(task) or task.assigned_agent != agent.agent_id:
                continue
            if returned and task_id not in unfinished:
                self.lifecycle.transition(task, TaskStatus.PENDING)
                await self.records.save(task)
            else:
                await self.dispatch.publish(task)

    async def settle_reloaded(self, pending: list[Task]) -> None:
        """Finish what a previous orchestrator stopped in the middle of.

        Finishing a task saves it before its dependents are published or
        ended, one by one; a restart in between leaves dependents pending that
        no event will release any more (their dependency is already final).
        So every reloaded pending task whose dependencies all completed is
        published now, and one with a dependency that ended otherwise ends as
        it would have (its own waiting dependents with it). Once, at start.
        """
        ready = []
        for task in pending:
            if not waiting_for_dependencies(task):
                continue  # already settled by a dependency ended earlier in this loop
            if not self.graph.is_waiting(task.task_id):
                log.info(
                    "task %s: dependencies met before the restart; publishing it", task.task_id
                )
                ready.append(task.task_id)
                continue
            for dep_id in task.dependencies:
                dep = self.records.get(dep_id)
                if (
                    dep is not None
                    and dep.status.is_final
                    and dep.status is not TaskStatus.COMPLETED
                ):
                    log.info(
                        "task %s: dependency %s ended before the restart", task.task_id, dep_id
                    )
                    await self.end_dependent(task, dep)
                    break
        await self.release(ready, "the restart")
        await self.records.flush()
