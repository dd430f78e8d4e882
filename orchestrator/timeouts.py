"""Run deadlines: the orchestrator's own watch on running tasks.

The agent enforces a task's ``timeout`` itself; this catches the agent that
went silent instead (hung, partitioned) but still holds the task. The
orchestrator also uses it to watch delayed retries.

The monitor asks for what expired on every tick, so that must not cost time
proportional to the tasks watched: deadlines sit in a min-heap, and a tick
looks only at its head (``O(expired + log n)``). A replaced or discarded
deadline stays in the heap, marked stale by its sequence number, and is
dropped when it reaches the head; when stale entries outnumber live ones the
heap is rebuilt, so memory stays proportional to the live deadlines and the
rebuild costs constant amortized time per change.
"""

from __future__ import annotations

import heapq
import itertools

_COMPACT_MIN = 64
"""Below this many heap entries stale ones are left to expire."""


class RunDeadlines:
    def __init__(self) -> None:
        self._live: dict[str, tuple[float, int, int]] = {}
        """task id -> (deadline, attempt, sequence number of its heap entry)"""
        self._heap: list[tuple[float, int, str, int]] = []
        """(deadline, sequence number, task id, attempt); stale if not in ``_live``."""
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._live

    def start(self, task_id: str, attempt: int, deadline: float) -> None:
        """Watch ``task_id`` until ``deadline`` (replacing any deadline it had)."""
        seq = next(self._seq)
        self._live[task_id] = (deadline, attempt, seq)
        heapq.heappush(self._heap, (deadline, seq, task_id, attempt))
        self._compact()

    def discard(self, task_id: str) -> None:
        if self._live.pop(task_id, None) is not None:
            self._compact()

    def postpone(self, seconds: float) -> None:
        """Push every deadline back (after a time in which nobody could report).

        Rare (the broker link came back), so it rebuilds the heap: O(n).
        """
        self._live = {t: (d + seconds, a, s) for t, (d, a, s) in self._live.items()}
        self._rebuild()

    def expired(self, now: float) -> list[tuple[str, int]]:
        """(task id, attempt) of every deadline at or before ``now``, earliest
        first; they are forgotten."""
        late: list[tuple[str, int]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, task_id, attempt = heapq.heappop(heap)
            live = self._live.get(task_id)
            if live is not None and live[2] == seq:
                del self._live[task_id]
                late.append((task_id, attempt))
        return late

    def _compact(self) -> None:
        if len(self._heap) > _COMPACT_MIN and len(self._heap) > 2 * len(self._live):
            self._rebuild()

    def _rebuild(self) -> None:
        self._heap = [(d, s, t, a) for t, (d, a, s) in self._live.items()]
        heapq.heapify(self._heap)
