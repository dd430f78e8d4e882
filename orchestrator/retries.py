"""Retry policy: how long a failed task waits before its next attempt.

The delay is exponential with jitter, computed by tenacity's wait strategies;
the waiting itself is the broker's (a TTL queue), never a sleep here.
"""

from __future__ import annotations

from types import SimpleNamespace

from tenacity import wait_exponential, wait_random


class RetryPolicy:
    def __init__(self, base_delay: float = 1.0, max_delay: float = 300.0) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        # base * 2^(n-1), capped, plus up to one base of jitter so that tasks
        # failing together do not come back together.
        self._wait = wait_exponential(multiplier=base_delay, max=max_delay) + wait_random(
            0, base_delay
        )

    def delay(self, retry_number: int) -> float:
        """Seconds before retry number ``retry_number`` (1 for the first retry)."""
        state = SimpleNamespace(attempt_number=max(1, retry_number))
        return min(self.max_delay, float(self._wait(state)))  # type: ignore[arg-type]
