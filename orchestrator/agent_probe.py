"""Asking the broker whether an agent still lives: the probe behind ``AgentRegistry.lost``.

Heartbeats say an agent lives; their silence says little at once (a flood,
a slow consumer, a broker restart). The broker knows sooner: an agent's
control queue is exclusive, deleted when its connection closes (a SIGKILL, a
crash), and at that moment the broker gives the agent's unacknowledged tasks
back. So an agent that missed ``MISSED_BEATS`` heartbeats, or a holder
whose task came back to another agent (``suspect``), is asked about at the
broker (``CommunicationBus.agent_connected``), and one whose queue stays
gone ``GONE_GRACE`` is dead. This module owns those questions: when one is
due, how often one agent is asked, how many per round, and the grace; the
registry owns who is registered and decides, with the heartbeat timeout and
the flood of refused messages, whom to remove.
"""

from __future__ import annotations

import logging

from broker import BusError, CommunicationBus

log = logging.getLogger(__name__)

MISSED_BEATS = 2
"""Heartbeats an agent may miss before the broker is asked whether it is connected."""
MIN_PROBE_SILENCE = 1.0
"""Seconds of silence before any such question, and between two about one agent."""
PROBES_PER_ROUND = 200
"""Questions to the broker per watch round at most (the rest wait for the next)."""
GONE_GRACE = 3.0
"""Seconds an agent's control queue must stay gone before it is removed (at least
three of the bus's reconnect intervals): an agent reconnecting after a blip, or
after a broker restart, declares it again within that."""


class AgentProbe:
    """What the broker said of each agent's connection, and when it was asked."""

    def __init__(self, bus: CommunicationBus) -> None:
        self.bus = bus
        self._probed: dict[str, tuple[float, bool | None]] = {}
        """Per agent, when the broker was last asked about it and what it said."""
        self._gone_since: dict[str, float] = {}
        """Per agent, when the broker first said its control queue was gone
        (since it was last heard of)."""
        self._suspects: set[str] = set()
        """Agents whose held task came back to another agent (``suspect``): asked
        about at the broker every round, silent or not, until it says they live."""
        self._asked = 0
        """Questions asked this round (``new_round``)."""

    def suspect(self, agent_id: str) -> None:
        """A task ``agent_id`` holds came back to another agent: the broker gives
        a delivery back when its channel or connection closes, so the holder may
        be dead though its last heartbeat is recent. From the next round on it
        is asked about at the broker without waiting for its silence (then, as
        for a silent agent, gone for ``GONE_GRACE`` means removed), instead of
        the copy waiting up to ``MISSED_BEATS`` intervals plus the grace."""
        self._suspects.add(agent_id)
        self._probed.pop(agent_id, None)  # what it said before the delivery came back

    def heard(self, agent_id: str) -> None:
        """A heartbeat: whatever the broker said of its queue being gone is past."""
        self._gone_since.pop(agent_id, None)

    def forget(self, agent_id: str) -> None:
        """The agent was removed: nothing is kept of it."""
        self._probed.pop(agent_id, None)
        self._gone_since.pop(agent_id, None)
        self._suspects.discard(agent_id)

    def postpone(self) -> None:
        """Nobody could be heard for a while: what the broker said before is forgotten."""
        self._gone_since.clear()
        self._probed.clear()

    def new_round(self) -> None:
        """A watch round starts: ``PROBES_PER_ROUND`` questions may be asked in it."""
        self._asked = 0

    async def ask(
        self,
        agent_id: str,
        *,
        beat: tuple[float, float | None] | None,
        silence: float,
        timeout: float,
        now: float,
    ) -> bool | None:
        """What the broker says of ``agent_id``'s connection if a question is
        due: for a ``suspect``, or for an agent heard from (``beat``: its last
        heartbeat and interval) silent for ``MISSED_BEATS`` intervals (a third
        of ``timeout`` until its interval is known). None if none is due or the
        broker cannot say."""
        suspect = agent_id in self._suspects
        if not (suspect or (beat is not None and silence >= _ask_after(beat[1], timeout))):
            return None
        interval = beat[1] if beat is not None else None
        connected = await self._connected(agent_id, interval, now)
        if connected is True:
            self._suspects.discard(agent_id)
        return connected

    def gone_for_grace(self, agent_id: str, now: float) -> bool:
        """The broker says ``agent_id``'s queue is gone: whether it has been for the grace."""
        since = self._gone_since.setdefault(agent_id, now)
        grace = max(GONE_GRACE, 3 * self.bus.settings.reconnect_interval)
        return now - since >= grace

    async def _connected(self, agent_id: str, interval: float | None, now: float) -> bool | None:
        """What the broker says of ``agent_id``'s connection (None: it cannot
        say), asked again only once per interval and ``PROBES_PER_ROUND`` a round."""
        when, said = self._probed.get(agent_id, (None, None))
        again = max(MIN_PROBE_SILENCE, interval or 0.0)
        if when is not None and now - when < again and agent_id not in self._gone_since:
            return said
        if self._asked >= PROBES_PER_ROUND:
            return said
        self._asked += 1
        try:
            said = await self.bus.agent_connected(agent_id)
        except BusError as exc:
            log.info("cannot ask the broker whether agent %s is connected: %s", agent_id, exc)
            said = None
        if said is True:
            self._gone_since.pop(agent_id, None)
        self._probed[agent_id] = (now, said)
        return said


def _ask_after(interval: float | None, timeout: float) -> float:
    if interval is None:
        return max(MIN_PROBE_SILENCE, timeout / 3)
    return min(max(MIN_PROBE_SILENCE, MISSED_BEATS * interval), timeout)
