"""Redelivered copies of attempts nobody is known to hold: when they may run.

A copy asks first (``TaskAssigned`` with ``confirm``): its message came back,
so an agent had it, and may have run it quickly (a quick attempt tells no
start) with its final event still on the way. The copy must not run beside
that attempt. Waiting ``unseen_holder_grace`` for such an event is safe but
costs every copy that long, in a slot of its agent: after a broker node's
restart every message of its queues comes back marked redelivered, and 1,000
copies held 20 slots for 3 s each (a test of a cluster node's loss took
minutes).

So the orchestrator asks instead: a ``SyncReports`` round goes to every agent,
and each answers ``TasksReported`` once every attempt it holds has told its
start and every one that ended has its final event confirmed, on the channel
the answer then goes out on, so the orchestrator reads those events first.
Once every registered agent answered a round that began after a copy asked,
no unreported run of its attempt exists on a registered agent (an agent that
is not registered could not report one: its events are refused), and the copy
proceeds, unless the attempt's end or a holder turned up meanwhile. An agent
that does not answer (its link is down) is waited for the grace, as before.
Copies that ask during a round wait for the next one: one round at a time,
however many copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from broker import CommunicationBus, SyncReports

log = logging.getLogger(__name__)

Proceed = Callable[[str, int, str], Awaitable[None]]
"""(task id, attempt, agent id): let that agent's copy run, if still right."""


class CopyRounds:
    """Runs ``SyncReports`` rounds for the copies waiting, one round at a time."""

    def __init__(
        self,
        bus: CommunicationBus,
        agents: Callable[[], Iterable[str]],
        proceed: Proceed,
        grace: Callable[[], float],
    ) -> None:
        self._bus = bus
        self._agents = agents
        self._proceed = proceed
        self._grace = grace
        self._next: dict[tuple[str, int, str], None] = {}
        """Copies asking since the current round began: they wait for the next."""
        self._round = 0
        self._expected: set[str] = set()
        self._answered: set[str] = set()
        self._all_answered = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        return len(self._next)

    def wait(self, task_id: str, attempt: int, agent_id: str) -> None:
        """The copy of ``attempt`` at ``agent_id`` runs once a round after now is answered."""
        self._next[(task_id, attempt, agent_id)] = None
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())

    def reported(self, agent_id: str, round_: int) -> None:
        """``agent_id`` answered ``round_``; an answer to another round is stale."""
        if round_ != self._round:
            return
        self._answered.add(agent_id)
        if self._expected <= self._answered:
            self._all_answered.set()

    async def _run(self) -> None:
        while self._next:
            batch = list(self._next)
            self._next.clear()
            await self._one_round()
            for task_id, attempt, agent_id in batch:
                try:
                    await self._proceed(task_id, attempt, agent_id)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the agent asks again
                    log.warning("task %s: proceeding agent %s failed: %s", task_id, agent_id, exc)

    async def _one_round(self) -> None:
        self._round += 1
        self._expected = set(self._agents())
        self._answered = set()
        self._all_answered = asyncio.Event()
        grace = self._grace()
        if not self._expected:
            return  # no registered agent could hold an unreported run
        try:
            await self._bus.publish_control(SyncReports(round=self._round))
        except Exception as exc:
            log.warning("reports round %d not sent (%s): waiting %.1fs", self._round, exc, grace)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._all_answered.wait()
        if not self._all_answered.is_set():
            silent = sorted(self._expected - self._answered)
            log.info(
                "reports round %d: no answer from %d agent(s) within %.1fs (%s)",
                self._round,
                len(silent),
                grace,
                ", ".join(silent[:5]),
            )

    async def stop(self) -> None:
        """Nothing proceeds after the orchestrator stops."""
        self._next.clear()
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
