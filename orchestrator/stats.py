"""Running statistics, updated on every status change in constant time.

``get_stats`` must not scan the tasks: counters move with each transition.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from broker import DeadLetter

from .lifecycle import Move
from .models import AgentCapability, Task, TaskStatus

_WAITING = (TaskStatus.PENDING, TaskStatus.ASSIGNED)
_FAILED = (TaskStatus.FAILED, TaskStatus.TIMEOUT)


DEAD_LETTER_KINDS = ("task", "event", "control", "other")
"""What a dead letter was, as counted: a task message, an agent's event, a command, or
anything else (unparseable). The body's own ``kind`` is input, so it is not a label."""


def dead_letter_kind(letter: DeadLetter) -> str:
    """``DEAD_LETTER_KINDS``' word for ``letter``: what its body says it is, or a
    task message when only its message id (``<task_id>:<attempt>``) says so."""
    kind = letter.kind
    if kind == "task" or (kind is None and letter.attempt is not None):
        return "task"
    if kind is not None and kind.startswith(("task.", "agent.")):
        return "event"
    if kind is not None and kind.startswith("control."):
        return "control"
    return "other"


class StatsTracker:
    def __init__(self) -> None:
        self.created = 0
        self.by_status: Counter[TaskStatus] = Counter()
        self._completion_seconds = 0.0
        self._completion_count = 0
        self.retired: dict[str, Any] = {}
        """What the forgotten tasks add to the counts (kept in the store's meta)."""
        self.dead_letters: Counter[str] = Counter()
        """Dead letters received since start, by ``dead_letter_kind``."""

    def dead_lettered(self, letter: DeadLetter) -> None:
        """A dead letter arrived (counted whatever then becomes of it)."""
        self.dead_letters[dead_letter_kind(letter)] += 1

    def created_task(self, task: Task) -> None:
        self.created += 1
        self.by_status[task.status] += 1

    def forget_task(self, task: Task) -> None:
        """Undo ``created_task`` for a submit that did not go through."""
        self.created -= 1
        self.by_status[task.status] -= 1

    def moved(self, task: Task, move: Move) -> None:
        """A ``Lifecycle`` observer: every status change is counted here (as
        ``transition`` counts it, written out: three calls per task fewer)."""
        old, new = move.old, move.new
        if old is new:
            return
        by_status = self.by_status
        by_status[old] -= 1
        by_status[new] += 1
        if new is TaskStatus.COMPLETED:
            self._count_completion(task)

    def transition(self, task: Task, old: TaskStatus) -> None:
        """Call after ``task.status`` changed from ``old``."""
        if old is task.status:
            return
        self.by_status[old] -= 1
        self.by_status[task.status] += 1
        if task.status is TaskStatus.COMPLETED:
            self._count_completion(task)

    def _count_completion(self, task: Task) -> None:
        if task.completed_at is None:
            return
        began = task.started_at if task.started_at is not None else task.created_at
        self._completion_seconds += max(0.0, task.completed_at - began)
        self._completion_count += 1

    def retire(self, task: Task) -> None:
        """``task`` (finished) leaves the store; it goes on counting here."""
        retired = self.retired
        retired["created"] = retired.get("created", 0) + 1
        by_status = retired.setdefault("by_status", {})
        by_status[task.status.value] = by_status.get(task.status.value, 0) + 1
        if task.status is TaskStatus.COMPLETED and task.completed_at is not None:
            began = task.started_at if task.started_at is not None else task.created_at
            retired["seconds"] = retired.get("seconds", 0.0) + max(0.0, task.completed_at - began)
            retired["count"] = retired.get("count", 0) + 1

    def rebuild(self, tasks: Iterable[Task], retired: dict[str, Any] | None = None) -> None:
        """Recount from stored records and what forgotten ones added (after a
        restart with a persistent store)."""
        dead_letters = self.dead_letters
        self.__init__()
        self.dead_letters = dead_letters
        self.retired = dict(retired or {})
        self.created = self.retired.get("created", 0)
        for status, count in self.retired.get("by_status", {}).items():
            self.by_status[TaskStatus(status)] += count
        self._completion_seconds = self.retired.get("seconds", 0.0)
        self._completion_count = self.retired.get("count", 0)
        for task in tasks:
            self.created += 1
            self.by_status[task.status] += 1
            if task.status is TaskStatus.COMPLETED:
                self._count_completion(task)

    def snapshot(
        self, agents: Iterable[AgentCapability], refused: Mapping[str, int] | None = None
    ) -> dict[str, Any]:
        """The seed's figures, and (beyond it) ``refused_messages``: the untrusted
        messages refused, by reason (``orchestrator.refusals``), and
        ``dead_letters``: the dead letters received, by what they were."""
        agents = list(agents)
        capacity = sum(a.max_concurrent_tasks for a in agents)
        load = sum(a.current_load for a in agents)
        completed = self.by_status[TaskStatus.COMPLETED]
        return {
            "tasks_created": self.created,
            "tasks_completed": completed,
            "tasks_failed": sum(self.by_status[s] for s in _FAILED),
            "avg_completion_time": (
                self._completion_seconds / self._completion_count if self._completion_count else 0.0
            ),
            "pending_tasks": sum(self.by_status[s] for s in _WAITING),
            "running_tasks": self.by_status[TaskStatus.RUNNING],
            "completed_tasks": completed,
            "registered_agents": len(agents),
            "agent_utilization": {a.agent_id: a.utilization for a in agents},
            "overall_utilization": load / capacity if capacity else 0.0,
            "refused_messages": dict(refused or {}),
            "dead_letters": dict(self.dead_letters),
        }
