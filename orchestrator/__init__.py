"""The task orchestrator: the seed's ``TaskOrchestrator`` API and what it needs."""

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
