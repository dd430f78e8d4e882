"""The task orchestrator: the seed's ``TaskOrchestrator`` API and what it needs.

Every name of ``__all__`` is importable from here, but each is imported on
first use (PEP 562's module ``__getattr__``), not with the package: the
command line (``orchestrator.cli``) and the client import this package, and
most of their commands need none of the orchestrator itself, its stores
(asyncpg) or its metrics (prometheus_client), whose import would be most of
each invocation's start-up CPU.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import (
        Client,
        ClientError,
        InvalidRequest,
        OrchestratorError,
        OrchestratorUnavailable,
        TaskHandle,
        TaskNotFound,
    )
    from .dependencies import DependencyGraph
    from .idempotency import IdempotencyConflict
    from .leadership import NotLeader
    from .metrics import OrchestratorMetrics
    from .models import AgentCapability, Task, TaskPriority, TaskStatus
    from .postgres_store import PostgresStore
    from .retries import RetryPolicy
    from .service import OrchestratorService
    from .settings import OrchestratorSettings
    from .sqlite_store import SQLiteStore
    from .stats import StatsTracker
    from .store import MemoryStore, StateStore, StoreFenced
    from .sync_client import SyncClient, SyncTaskHandle
    from .task_orchestrator import TaskOrchestrator
    from .timeouts import RunDeadlines

__all__ = [
    # the seed's API
    "TaskOrchestrator",
    "TaskPriority",
    "TaskStatus",
    "Task",
    "AgentCapability",
    # the protocol for other services, and its client
    "OrchestratorService",
    "Client",
    "SyncClient",
    "TaskHandle",
    "SyncTaskHandle",
    "ClientError",
    "InvalidRequest",
    "TaskNotFound",
    "OrchestratorUnavailable",
    "OrchestratorError",
    "IdempotencyConflict",
    "NotLeader",
    # configuration and state
    "OrchestratorSettings",
    "StateStore",
    "MemoryStore",
    "SQLiteStore",
    "PostgresStore",
    "StoreFenced",
    # building blocks
    "DependencyGraph",
    "RetryPolicy",
    "RunDeadlines",
    "StatsTracker",
    "OrchestratorMetrics",
]

_MODULES = {
    "Client": "client",
    "ClientError": "client",
    "InvalidRequest": "client",
    "OrchestratorError": "client",
    "OrchestratorUnavailable": "client",
    "TaskHandle": "client",
    "TaskNotFound": "client",
    "DependencyGraph": "dependencies",
    "IdempotencyConflict": "idempotency",
    "NotLeader": "leadership",
    "OrchestratorMetrics": "metrics",
    "AgentCapability": "models",
    "Task": "models",
    "TaskPriority": "models",
    "TaskStatus": "models",
    "PostgresStore": "postgres_store",
    "RetryPolicy": "retries",
    "OrchestratorService": "service",
    "OrchestratorSettings": "settings",
    "SQLiteStore": "sqlite_store",
    "StatsTracker": "stats",
    "MemoryStore": "store",
    "StateStore": "store",
    "StoreFenced": "store",
    "SyncClient": "sync_client",
    "SyncTaskHandle": "sync_client",
    "TaskOrchestrator": "task_orchestrator",
    "RunDeadlines": "timeouts",
}
"""The module of this package that defines each public name."""


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # imported once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
