"""Listing tasks: the filters of ``list_tasks`` (and ``request.tasks``) and what
a list shows of each task.

Ids used to be the only handle on a task; a list answers "what is running on
agent X", "what failed in the last hour" without a store query. It reads the
identity map (``records``), so it lists what the orchestrator holds: finished
tasks until their retention ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from broker.rpc import MAX_TASKS_LISTED

from .models import Task, TaskStatus
from .records import TaskRecords

DEFAULT_LIMIT = 50
"""How many tasks a list shows unless told."""


def statuses_of(status: TaskStatus | str | Iterable[TaskStatus | str] | None) -> set[TaskStatus]:
    """The statuses asked for (none: any); ``ValueError`` names a bad one."""
    if status is None:
        return set()
    given = [status] if isinstance(status, TaskStatus | str) else list(status)
    found = set()
    for value in given:
        try:
            found.add(value if isinstance(value, TaskStatus) else TaskStatus(str(value).lower()))
        except ValueError:
            names = ", ".join(s.value for s in TaskStatus)
            raise ValueError(f"status: must be one of {names}, got {value!r}") from None
    return found


def list_tasks(
    records: TaskRecords,
    status: TaskStatus | str | Iterable[TaskStatus | str] | None = None,
    task_type: str | None = None,
    agent_id: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[dict[str, Any]]:
    """The matching tasks, most recently created first, as ``summary`` gives them."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_TASKS_LISTED:
        raise ValueError(f"limit: must be an integer from 1 to {MAX_TASKS_LISTED}, got {limit!r}")
    tasks = records.newest(
        limit, statuses=statuses_of(status), task_type=task_type, agent_id=agent_id
    )
    return [summary(task) for task in tasks]


def summary(task: Task) -> dict[str, Any]:
    """What a list shows of a task (``broker.rpc.TaskSummary``): no payload or result."""
    return {
        "task_id": task.task_id,
        "name": task.name,
        "task_type": task.task_type,
        "status": task.status.value,
        "priority": task.priority.value,
        "assigned_agent": task.assigned_agent,
        "created_at": task.created_at,
        "started_at": task.started_at,
        "completed_at": task.completed_at,
        "retry_count": task.retry_count,
        "error_message": task.error_message,
    }
