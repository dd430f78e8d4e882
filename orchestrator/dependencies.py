"""The dependency graph: which waiting tasks each task releases or dooms.

Finishing a task costs time proportional to its own dependents, never to
the number of tasks: dependents are indexed by the task they wait for.
"""

from __future__ import annotations

from collections import defaultdict


class DependencyGraph:
    def __init__(self) -> None:
        self._unmet: dict[str, set[str]] = {}
        self._dependents: defaultdict[str, list[str]] = defaultdict(list)

    def wait(self, task_id: str, unmet: list[str]) -> None:
        """Record that ``task_id`` waits for the ``unmet`` tasks to complete."""
        self._unmet[task_id] = set(unmet)
        for dep in unmet:
            self._dependents[dep].append(task_id)

    def is_waiting(self, task_id: str) -> bool:
        return task_id in self._unmet

    def completed(self, task_id: str) -> list[str]:
        """``task_id`` completed: the dependents that now have every dependency met."""
        ready = []
        for dependent in self._dependents.pop(task_id, ()):
            unmet = self._unmet.get(dependent)
            if unmet is None:
                continue
            unmet.discard(task_id)
            if not unmet:
                del self._unmet[dependent]
                ready.append(dependent)
        return ready

    def doomed(self, task_id: str) -> list[tuple[str, str]]:
        """``task_id`` will never complete: every waiting task that now never can,
        transitively, each with the id of the dependency that doomed it."""
        doomed: list[tuple[str, str]] = []
        stack = [task_id]
        while stack:
            current = stack.pop()
            for dependent in self._dependents.pop(current, ()):
                if self._unmet.pop(dependent, None) is not None:
                    doomed.append((dependent, current))
                    stack.append(dependent)
        return doomed

    def forget(self, task_id: str) -> None:
        """``task_id`` no longer waits (it was cancelled); its dependents stay indexed."""
        self._unmet.pop(task_id, None)
