"""Refused messages: counted by reason, logged without flooding the log.

The bus is shared with other teams' clients, so what arrives is untrusted:
a message that claims an agent it was not sent by, an event for an attempt
its agent does not hold, an announcement ``register_agent`` would refuse.
Such a message is dropped (acknowledged, no side effect), counted under its
reason, and logged at WARNING, at most once per reason every
``LOG_INTERVAL`` seconds with how many were refused meanwhile: a flood of
them costs a dictionary lookup each, not a log line each.

``RateLimit`` bounds what the orchestrator sends back in answer to a
stranger (a ``Reannounce`` to a heartbeat of an unknown id), per id and in
all, so that a flood is never amplified.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable

log = logging.getLogger(__name__)

LOG_INTERVAL = 10.0
"""Seconds between two log lines of one refusal reason."""

FLOOD_WINDOW = 30.0
"""Seconds a burst of refused agent messages is remembered (``Refusals.flooded``)."""
FLOOD_THRESHOLD = 1000
"""Refused agent messages within ``FLOOD_WINDOW`` that make it a flood."""


class Refusals:
    """What was refused, by reason (``counts``); logs rate-limited per reason."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, interval: float = LOG_INTERVAL
    ) -> None:
        self._clock = clock
        self._interval = interval
        self.counts: Counter[str] = Counter()
        self._last_logged: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()
        self._recent: deque[tuple[float, int]] = deque()
        """(second, refusals in it) of the last ``FLOOD_WINDOW``."""
        self._recent_total = 0

    def refuse(self, reason: str, detail: str) -> None:
        """Count one refused message; log it unless ``reason`` was logged lately."""
        self.counts[reason] += 1
        now = self._clock()
        self._note(now)
        last = self._last_logged.get(reason)
        if last is not None and now - last < self._interval:
            self._unlogged[reason] += 1
            return
        self._last_logged[reason] = now
        also = self._unlogged.pop(reason, 0)
        log.warning(
            "refused a message (%s): %s%s",
            reason,
            detail,
            f" (and {also} more of this kind since the last report)" if also else "",
        )

    def _note(self, now: float) -> None:
        second = int(now)
        if self._recent and self._recent[-1][0] == second:
            self._recent[-1] = (second, self._recent[-1][1] + 1)
        else:
            self._recent.append((second, 1))
        self._recent_total += 1
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - FLOOD_WINDOW:
            self._recent_total -= self._recent.popleft()[1]

    def flooded(self) -> bool:
        """Whether a flood of refused messages came within ``FLOOD_WINDOW``:
        then a real agent's heartbeats may have waited behind it, or been
        dropped from a full queue, and its silence proves nothing."""
        self._expire(self._clock())
        return self._recent_total >= FLOOD_THRESHOLD

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


class RateLimit:
    """At most one answer per key every ``per_key`` seconds, and at most
    ``burst`` answers in all per ``window`` seconds; keys remembered: ``keep``."""

    def __init__(
        self,
        *,
        per_key: float = 5.0,
        burst: int = 5,
        window: float = 1.0,
        keep: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_key = per_key
        self._burst = burst
        self._window = window
        self._keep = keep
        self._clock = clock
        self._last: OrderedDict[str, float] = OrderedDict()
        self._sent: deque[float] = deque()

    def allow(self, key: str) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._per_key:
            return False
        while self._sent and self._sent[0] <= now - self._window:
            self._sent.popleft()
        if len(self._sent) >= self._burst:
            return False
        self._sent.append(now)
        self._last[key] = now
        self._last.move_to_end(key)
        if len(self._last) > self._keep:
            self._last.popitem(last=False)
        return True
