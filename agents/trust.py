"""Which commands an agent obeys: only the orchestrator's, only what it can do.

Anyone on a shared broker can publish to the control exchange. An agent
obeys a command only when the broker says it came from the orchestrator's
user (``current_sender``: RabbitMQ's checked ``user_id``, compared with
``bus.orchestrator_user``, which is the agent's own user unless
``ORCHESTRATOR_ORCHESTRATOR_USER`` says otherwise: one user for everything
is one trust domain), and not from a leader older than one it has heard
(the epoch every command carries: a paused leader that wakes up after a
takeover is fenced here as in the store). A ``ConsumeQueues`` naming a queue whose task type or
capabilities the agent lacks has that queue refused (the rest are consumed).
Refused commands are counted by reason (``ControlGate.refused``) and logged
at WARNING at most once per reason every ``LOG_INTERVAL`` seconds.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping

from broker import ANY_CAPABILITY_KEY, DIGEST_PREFIX, capability_key, route_key
from broker.envelope import Sender

log = logging.getLogger(__name__)

LOG_INTERVAL = 10.0
ANY_TASK_TYPE = "*"


class ControlGate:
    """The agent's refusals of commands, counted and logged rate-limited."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.refused: Counter[str] = Counter()
        self.leader: tuple[str, int] | None = None
        """The (lineage, epoch) of the newest leader heard."""
        self._logged: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    def from_orchestrator(
        self, sender: Sender | None, orchestrator_user: str | None, kind: str
    ) -> bool:
        """Whether a command of ``kind`` from ``sender`` is to be obeyed (None:
        an in-process call, not the bus's: trusted)."""
        if sender is None:
            return True
        if orchestrator_user is None or sender.user != orchestrator_user:
            self.refuse(
                "not_orchestrator",
                f"{kind} from user {sender.user!r}; commands are obeyed from {orchestrator_user!r}",
            )
            return False
        return self._from_current_leader(sender.leader, kind)

    def _from_current_leader(self, leader: tuple[str, int] | None, kind: str) -> bool:
        """A command of an older epoch of the store than one heard is a paused
        leader's that woke after a takeover: refused. One of another store (an
        orchestrator restarted on a fresh one), or carrying none, is obeyed."""
        if leader is None:
            return True
        lineage, epoch = leader
        if self.leader is not None and lineage == self.leader[0] and epoch < self.leader[1]:
            self.refuse(
                "stale_leader",
                f"{kind} from the leader of epoch {epoch}; epoch {self.leader[1]} leads now",
            )
            return False
        self.leader = leader
        return True

    def refuse(self, reason: str, detail: str) -> None:
        self.refused[reason] += 1
        now = time.monotonic()
        last = self._logged.get(reason)
        if last is not None and now - last < LOG_INTERVAL:
            self._unlogged[reason] += 1
            return
        self._logged[reason] = now
        also = self._unlogged.pop(reason, 0)
        log.warning(
            "agent %s: refused a command (%s): %s%s",
            self.agent_id,
            reason,
            detail,
            f" (and {also} more since the last report)" if also else "",
        )

    def runnable(
        self,
        queue_keys: Iterable[str],
        capabilities: Iterable[str],
        task_types: Iterable[str],
        digests: Mapping[str, Iterable[str]] | None = None,
    ) -> list[str]:
        """The keys of ``queue_keys`` this agent can run; the others are refused.
        ``digests``: what the digest keys among them stand for, as told."""
        keys = list(queue_keys)
        told = digests or {}
        ok = [k for k in keys if can_run_key(k, capabilities, task_types, told.get(k))]
        if len(ok) < len(keys):
            others = sorted(set(keys) - set(ok))
            self.refuse(
                "cannot_run",
                f"told to consume {others[:5]} (of {len(others)}), whose task type or"
                " capabilities it does not have",
            )
        return ok


def can_run_key(
    key: str,
    capabilities: Iterable[str],
    task_types: Iterable[str],
    stands_for: Iterable[str] | None = None,
) -> bool:
    """Whether a queue key (``<task type>.<capability key>``, see
    ``broker.route_key``) names tasks this agent has a handler and the
    capabilities for. A capability key written as a digest (sets over 119
    characters) is run if it is the digest of ``stands_for`` (what the
    orchestrator says it is) and the agent has those, or, told nothing, the
    digest of this agent's whole set."""
    types = set(task_types)
    caps = sorted(set(capabilities))
    type_part, _, cap_key = key.rpartition(".")
    if type_part and ANY_TASK_TYPE not in types:
        if not any(route_key(t, caps).rpartition(".")[0] == type_part for t in types):
            return False
    if cap_key == ANY_CAPABILITY_KEY:
        return True
    if cap_key.startswith(DIGEST_PREFIX):
        if stands_for is not None:
            listed = set(stands_for)
            return cap_key == capability_key(listed) and listed <= set(caps)
        return cap_key == capability_key(caps)
    return set(cap_key.split("+")) <= set(caps)
