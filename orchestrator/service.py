"""The orchestrator's protocol for other services: requests on ``<prefix>.rpc``.

``OrchestratorService`` answers the request messages of ``broker.messages``
(submit, cancel, status, stats, agents, queues, tasks) with the ``TaskOrchestrator``
API, so that a service in any language, and the command line, can use a
running orchestrator. The bus does the AMQP part (reply_to, correlation_id);
this module only maps requests to the API and its answers to replies:

- a ``ValueError`` of the API (a bad field, named first) is an
  ``invalid_request`` error;
- an unknown task id is a ``not_found`` error;
- ``status`` and ``stats`` results are exactly ``get_task_status`` and
  ``get_stats``.
"""

from __future__ import annotations

import logging
from typing import Any

from broker import (
    AgentsRequest,
    BusError,
    CancelTaskRequest,
    QueuesRequest,
    Reply,
    Request,
    StatsRequest,
    SubmitTaskRequest,
    Subscription,
    TaskStatusRequest,
)
from broker.rpc import TasksRequest

from .leadership import Role
from .models import AgentCapability
from .task_orchestrator import TaskOrchestrator

log = logging.getLogger(__name__)


class OrchestratorService:
    """Serves the request protocol for one ``TaskOrchestrator`` on its bus."""

    def __init__(self, orchestrator: TaskOrchestrator) -> None:
        self.orchestrator = orchestrator
        self._subscription: Subscription | None = None
        self._running = False

    async def start(self) -> None:
        """Answer requests while the orchestrator leads (start it first).

        A standby's service consumes nothing, so that every request reaches
        the leader; it starts answering when its orchestrator takes over, and
        stops if it steps down.
        """
        if self._running:
            return
        self._running = True
        self.orchestrator.leadership.observe(self._role_changed)
        if self.orchestrator.leadership.is_leader:
            await self._serve()

    async def _role_changed(self, role: Role) -> None:
        if not self._running:
            return
        if role is Role.LEADER:
            await self._serve()
        else:
            await self._unserve()

    async def _serve(self) -> None:
        if self._subscription is None:
            self._subscription = await self.orchestrator.bus.serve_requests(self.handle)

    async def _unserve(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.close()

    async def stop(self) -> None:
        """Stop answering; requests wait in the queue for the next server."""
        self._running = False
        await self._unserve()

    async def __aenter__(self) -> OrchestratorService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def handle(self, request: Request) -> Reply:
        try:
            return Reply.success(await self._result(request))
        except _NotFound as exc:
            return Reply.failure("not_found", str(exc))
        except ValueError as exc:  # before BusError: MessageTooLarge is both
            return Reply.failure("invalid_request", str(exc))
        except (ConnectionError, BusError) as exc:
            return Reply.failure("unavailable", str(exc))

    async def _result(self, request: Request) -> Any:
        orchestrator = self.orchestrator
        if isinstance(request, SubmitTaskRequest):
            task_id = await orchestrator.submit_task(**request.model_dump(exclude={"v", "kind"}))
            log.info("submitted %s (%s) by request", task_id, request.name)
            return {"task_id": task_id}
        if isinstance(request, TaskStatusRequest):
            return await self._status(request.task_id)
        if isinstance(request, CancelTaskRequest):
            await self._status(request.task_id)
            cancelled = await orchestrator.cancel_task(request.task_id)
            status = await self._status(request.task_id)
            return {"task_id": request.task_id, "cancelled": cancelled, "status": status["status"]}
        if isinstance(request, StatsRequest):
            return await orchestrator.get_stats()
        if isinstance(request, AgentsRequest):
            return [agent_record(a) for a in await orchestrator.get_agents()]
        if isinstance(request, TasksRequest):
            return await orchestrator.list_tasks(
                request.status, request.task_type, request.agent_id, request.limit
            )
        if isinstance(request, QueuesRequest):
            bus = orchestrator.bus
            return [
                {
                    "key": key,
                    "queue": bus.topology.task_queue(key),
                    "task_type": spec.task_type,
                    "capabilities": list(spec.capabilities),
                    "depth": await bus.queue_depth(key),
                }
                for key, spec in sorted(orchestrator.dispatch.queues.in_use.items())
            ]
        raise ValueError(f"kind: no handler for {request.kind!r}")  # pragma: no cover

    async def _status(self, task_id: str) -> dict[str, Any]:
        status = await self.orchestrator.get_task_status(task_id)
        if status is None:
            raise _NotFound(f"task_id: unknown task {task_id!r}")
        return status


class _NotFound(LookupError):
    """Raised for a task id the orchestrator does not know."""


def agent_record(agent: AgentCapability) -> dict[str, Any]:
    """An agent as JSON: its seed fields, its utilisation and what it runs."""
    return {
        "agent_id": agent.agent_id,
        "capabilities": list(agent.capabilities),
        "max_concurrent_tasks": agent.max_concurrent_tasks,
        "current_load": agent.current_load,
        "utilization": agent.utilization,
        "performance_score": agent.performance_score,
        "specialization_score": dict(agent.specialization_score),
        "task_types": None if agent.task_types is None else list(agent.task_types),
        "running": sorted(agent.running),
        "last_seen": agent.last_seen,
    }
