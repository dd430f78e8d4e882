"""Run deadlines: the orchestrator's own watch on running tasks.

The agent enforces a task's ``timeout`` itself; this catches the agent that
went silent instead (hung, partitioned) but still holds the task. Checking
costs time proportional to the tasks running now, never to all tasks.
"""

from __future__ import annotations


class RunDeadlines:
    def __init__(self) -> None:
        self._deadlines: dict[str, tuple[float, int]] = {}

    def start(self, task_id: str, attempt: int, deadline: float) -> None:
        self._deadlines[task_id] = (deadline, attempt)

    def discard(self, task_id: str) -> None:
        self._deadlines.pop(task_id, None)

    def postpone(self, seconds: float) -> None:
        """Push every deadline back (after a time in which nobody could report)."""
        for task_id, (deadline, attempt) in self._deadlines.items():
            self._deadlines[task_id] = (deadline + seconds, attempt)

    def expired(self, now: float) -> list[tuple[str, int]]:
        """(task id, attempt) of every run past its deadline; they are forgotten."""
        late = [(t, a) for t, (d, a) in self._deadlines.items() if d <= now]
        for task_id, _ in late:
            del self._deadlines[task_id]
        return late
