"""Each role's RabbitMQ permissions, derived from the topology's value objects.

Four roles use a deployment's bus (one prefix), and each gets only what it
uses, so that a process of one role cannot act as another:

- ``orchestrator``: declares the shared topology (``Topology.everything()``,
  the capability queues, each registered agent's events queue, the leader
  lease), consumes its own queues and the requests, publishes tasks,
  retries, commands and replies.
- ``agent``: one user per agent, named after its agent id. It declares only
  its own control queue (exclusive) and binds it to the control exchange;
  it consumes task queues, publishes events keyed with its own id (a topic
  permission with RabbitMQ's ``{username}``) and dead letters. It cannot
  consume the request queue or the orchestrator's queues (its own events
  queue among them: it reaches it through the events exchange only), publish commands or
  tasks, or declare or delete any queue but its own.
- ``client``: a service that submits and queries. It publishes requests to
  the request queue through the default exchange and reads the replies
  through direct reply-to (which RabbitMQ checks no permission for); to wait
  on results it may have a monitor queue of its own bound to the task events.
- ``monitor``: ``orchestrator watch``: a monitor queue of its own bound to
  the events exchange; it reads every event and publishes nothing.

What RabbitMQ 3.10 checks, and so what each pattern below grants
(https://www.rabbitmq.com/access-control.html, and tests/test_permissions.py
on the real broker): ``queue.declare`` needs configure on the queue, and
with a dead-letter exchange write on that exchange and read on the queue;
a *passive* declare (of a queue or an exchange) needs nothing, which is how
agents and clients check the shared topology; ``queue.bind`` needs write on
the queue and read on the exchange, and on a topic exchange the binding key
must match the topic permission's read pattern; ``basic.publish`` needs
write on the exchange (``amq.default`` for the default exchange), and on a
topic exchange the routing key must match the topic permission's write
pattern; ``basic.consume``, ``basic.get`` and ``queue.purge`` need read on
the queue; ``queue.delete`` needs configure. Only topic permissions expand
variables (``{username}``, ``{vhost}``): the ordinary patterns of an agent
name its id literally. A user with no topic permission on an exchange may use
every routing key, so every role here has one on the events exchange.

Clients write to the requests exchange only, never to ``amq.default``, which
is write to every queue by name (only the orchestrator has it, for replies).
Known limits, stated rather than hidden: read on the task queues lets an
agent purge them. An agent may
bind its control queue under another agent's id and hear its commands.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .routing import AGENT_ID_PATTERN
from .topology import Declarations, Topology

Role = Literal["orchestrator", "agent", "client", "monitor"]
ROLES: tuple[Role, ...] = ("orchestrator", "agent", "client", "monitor")

NOTHING = "^$"
"""Matches no resource (names are never empty; the default exchange is ``amq.default``)."""

EVERYTHING = ".*"

DEFAULT_EXCHANGE = "amq.default"
"""The name RabbitMQ checks permissions on for the default exchange ``""``."""

OWN_EVENT_KEYS = r"^[^.]+\.[^.]+\.{username}$"
"""Topic write pattern of an agent: ``Topology.event_key`` (a two-word kind,
then the sender's id) with its own user name as the id."""

TASK_EVENT_KEYS = r"^task\."
"""Topic read pattern of a client: it binds only to task events (``task.#``, ``task.finished.#``)."""

REPLICA_SUFFIX = "[A-Za-z0-9_.:-]+"
"""What may follow ``<agent id>-`` in a replica's id (the agent-id alphabet)."""

AGENT_USER = "{agent_id}"
"""The user of an agent is named after its agent id (``{username}`` in its topic permission)."""


@dataclass(frozen=True)
class Permission:
    """``rabbitmqctl set_permissions``: three regular expressions over resource names."""

    configure: str
    write: str
    read: str


@dataclass(frozen=True)
class TopicPermission:
    """``rabbitmqctl set_topic_permissions``: regular expressions over routing keys
    (write: of messages published; read: of bindings) on one topic exchange."""

    exchange: str
    write: str
    read: str


@dataclass(frozen=True)
class RolePermissions:
    """What one role's user may do on one vhost."""

    role: Role
    user: str
    """The user these are for; for an agent, its agent id."""
    permission: Permission
    topic: tuple[TopicPermission, ...]
    description: str

    def as_json(self, vhost: str = "/") -> dict[str, Any]:
        """As the ``permissions`` and ``topic_permissions`` entries of a definitions document."""
        return {
            "role": self.role,
            "user": self.user,
            "description": self.description,
            "permissions": [
                {
                    "user": self.user,
                    "vhost": vhost,
                    "configure": self.permission.configure,
                    "write": self.permission.write,
                    "read": self.permission.read,
                }
            ],
            "topic_permissions": [
                {
                    "user": self.user,
                    "vhost": vhost,
                    "exchange": t.exchange,
                    "write": t.write,
                    "read": t.read,
                }
                for t in self.topic
            ],
        }

    def commands(self, vhost: str = "/") -> list[list[str]]:
        """The ``rabbitmqctl`` commands (argument lists) that grant them."""
        p = self.permission
        grant = ["rabbitmqctl", "set_permissions", "-p", vhost, self.user]
        found = [[*grant, p.configure, p.write, p.read]]
        for t in self.topic:
            topic = ["rabbitmqctl", "set_topic_permissions", "-p", vhost, self.user]
            found.append([*topic, t.exchange, t.write, t.read])
        return found

    def shell(self, vhost: str = "/") -> str:
        """The commands as shell lines, quoted."""
        return "\n".join(shlex.join(command) for command in self.commands(vhost))


# --- regular expressions from names ---------------------------------------------------


def exactly(names: Iterable[str], patterns: Iterable[str] = ()) -> str:
    """A pattern that matches these names exactly, and names matching ``patterns``
    (each a regular expression without anchors); ``NOTHING`` for none.

    Names a pattern covers are left out, and names of one parent (``p.retry.100``,
    ``p.retry.250``) are written as one group, so that an operator can read it."""
    patterns = list(patterns)
    kept = sorted(n for n in set(names) if not any(re.fullmatch(p, n) for p in patterns))
    parents: dict[str, list[str]] = {}
    for name in kept:
        parent, dot, last = name.rpartition(".")
        parents.setdefault(parent if dot else "", []).append(last if dot else name)
    alternatives = []
    for parent, lasts in parents.items():
        if parent and len(lasts) > 1:
            group = "|".join(re.escape(last) for last in lasts)
            alternatives.append(f"{re.escape(parent)}\\.({group})")
        else:
            alternatives += [re.escape(f"{parent}.{last}" if parent else last) for last in lasts]
    alternatives += patterns
    if not alternatives:
        return NOTHING
    return "^(" + "|".join(alternatives) + ")$"


def names_of(declarations: Declarations) -> set[str]:
    """The names of the exchanges and queues a group declares."""
    return {e.name for e in declarations.exchanges} | {q.name for q in declarations.queues}


def capability_queues(topology: Topology) -> str:
    """Every task queue of the prefix (their keys depend on the tasks submitted)."""
    return re.escape(topology.task_queue("")) + ".+"


def agent_event_queues(topology: Topology) -> str:
    """Every agent's events queue (``Topology.agent_events``: their ids depend
    on who registers): the orchestrator's, to declare, consume and delete."""
    return re.escape(topology.agent_events_queue("")) + ".+"


def monitor_queues(topology: Topology) -> str:
    """Every monitor queue of the prefix (each has a random suffix)."""
    return re.escape(topology.monitor((), "").queue.name) + ".+"


def shared(topology: Topology) -> Declarations:
    """What only the orchestrator declares: everything but agents' and monitors'
    own queues, and its leader lease (where the topology has one)."""
    groups = topology.everything()
    if hasattr(topology, "leader_lease"):
        groups += topology.leader_lease()
    return groups


# --- the roles ---------------------------------------------------------------------------


def orchestrator(topology: Topology, user: str = "orchestrator") -> RolePermissions:
    # (an earlier version's events queue: it unbinds, drains and deletes it)
    names = names_of(shared(topology)) | {topology.legacy_events_queue}
    tasks = [capability_queues(topology), agent_event_queues(topology)]
    return RolePermissions(
        role="orchestrator",
        user=user,
        permission=Permission(
            configure=exactly(names, tasks),
            # amq.default: replies to the clients' direct reply-to
            write=exactly(names | {DEFAULT_EXCHANGE}, tasks),
            read=exactly(names, tasks),
        ),
        topic=(TopicPermission(topology.events_exchange, write=NOTHING, read=EVERYTHING),),
        description="declares the shared topology; consumes events, dead letters and"
        " requests; publishes tasks, retries, commands and replies",
    )


def agent(topology: Topology, agent_id: str, *, replicas: bool = False) -> RolePermissions:
    """An agent's user, named after its id: the ordinary patterns name the id
    literally (RabbitMQ expands ``{username}`` only in topic permissions).

    ``replicas``: the user also runs the agents ``<agent_id>-<anything>``
    (``analyst-3f2a``: replicas that take their host's name), each with its
    own control queue and event keys."""
    if not AGENT_ID_PATTERN.match(agent_id):
        raise ValueError(f"agent_id: {agent_id!r} is not an agent id ({AGENT_ID_PATTERN.pattern})")
    own = topology.agent_control(agent_id)
    queues = {q.name for q in own.queues}
    replica_queues = [re.escape(topology.agent_control_queue(f"{agent_id}-")) + REPLICA_SUFFIX]
    mine = replica_queues if replicas else []
    bound_from = {b.exchange.name for b in own.bindings}
    publishes = {topology.events_exchange, topology.dead_exchange}
    keys = OWN_EVENT_KEYS.replace("$", f"(-{REPLICA_SUFFIX})?$") if replicas else OWN_EVENT_KEYS
    return RolePermissions(
        role="agent",
        user=agent_id,
        permission=Permission(
            configure=exactly(queues, mine),
            write=exactly(queues | publishes, mine),
            read=exactly(queues | bound_from, [*mine, capability_queues(topology)]),
        ),
        topic=(TopicPermission(topology.events_exchange, write=keys, read=NOTHING),),
        description="declares its own control queue only; consumes task queues;"
        " publishes events keyed with its own id, and dead letters"
        + (f"; also runs the replicas {agent_id}-*" if replicas else ""),
    )


def client(topology: Topology, user: str = "client") -> RolePermissions:
    monitors = [monitor_queues(topology)]
    return RolePermissions(
        role="client",
        user=user,
        permission=Permission(
            configure=exactly((), monitors),
            # The requests exchange only: never amq.default, which reaches every queue
            write=exactly({topology.requests_exchange}, monitors),
            read=exactly({topology.events_exchange}, monitors),
        ),
        topic=(TopicPermission(topology.events_exchange, write=NOTHING, read=TASK_EVENT_KEYS),),
        description="sends requests (submit, status, cancel...) and reads their replies"
        " (direct reply-to); may wait on task events in a queue of its own",
    )


def monitor(topology: Topology, user: str = "monitor") -> RolePermissions:
    monitors = [monitor_queues(topology)]
    return RolePermissions(
        role="monitor",
        user=user,
        permission=Permission(
            configure=exactly((), monitors),
            write=exactly((), monitors),
            read=exactly({topology.events_exchange}, monitors),
        ),
        topic=(TopicPermission(topology.events_exchange, write=NOTHING, read=EVERYTHING),),
        description="orchestrator watch: reads every event in a queue of its own",
    )


def role_permissions(topology: Topology, role: Role, user: str | None = None) -> RolePermissions:
    """One role's permissions; for ``agent``, ``user`` is the agent id (required)."""
    if role == "agent":
        if not user:
            raise ValueError("user: an agent's user is named after its agent id")
        return agent(topology, user)
    makers = {"orchestrator": orchestrator, "client": client, "monitor": monitor}
    if role not in makers:
        raise ValueError(f"role: {role!r} is not one of {', '.join(ROLES)}")
    return makers[role](topology, user or role)


def every_role(
    topology: Topology, agent_ids: Sequence[str] = (), users: dict[str, str] | None = None
) -> list[RolePermissions]:
    """The orchestrator, client and monitor users (named after their role unless
    ``users`` says otherwise) and one user per agent id."""
    users = users or {}
    found = [role_permissions(topology, role, users.get(role)) for role in ROLES if role != "agent"]
    found += [agent(topology, agent_id) for agent_id in agent_ids]
    return found


def export(topology: Topology, vhost: str = "/", agent_ids: Sequence[str] = ()) -> dict[str, Any]:
    """Every role's permissions as JSON: the agent role as a template (its user,
    ``{agent_id}``, stands for each agent's id) and one entry per ``agent_ids``."""
    template = agent(topology, "AGENT_ID")
    roles = [r.as_json(vhost) for r in every_role(topology)]
    agent_json = _templated(template.as_json(vhost), "AGENT_ID", AGENT_USER)
    return {
        "prefix": topology.prefix,
        "vhost": vhost,
        "roles": {
            **{r["role"]: r for r in roles},
            "agent": agent_json,
        },
        "agents": [agent(topology, a).as_json(vhost) for a in agent_ids],
    }


def _templated(value: Any, placeholder: str, replacement: str) -> Any:
    if isinstance(value, str):
        return value.replace(placeholder, replacement)
    if isinstance(value, list):
        return [_templated(v, placeholder, replacement) for v in value]
    if isinstance(value, dict):
        return {k: _templated(v, placeholder, replacement) for k, v in value.items()}
    return value


def shell_script(topology: Topology, vhost: str = "/", agent_ids: Sequence[str] = ()) -> str:
    """The ``rabbitmqctl`` commands of every role, as a shell script an operator
    runs once the users exist (``rabbitmqctl add_user NAME`` reads the password
    from stdin)."""
    lines = [
        f"# RabbitMQ permissions of prefix {topology.prefix!r} on vhost {vhost!r},",
        "# generated by `orchestrator topology --permissions rabbitmqctl`.",
        "# Create each user first (no tags), e.g.: rabbitmqctl add_user orchestrator",
        "# Agents obey commands only from the orchestrator's user: run them with",
        "# ORCHESTRATOR_ORCHESTRATOR_USER set to its name.",
    ]
    roles = every_role(topology, agent_ids or ("AGENT_ID",))
    for role in roles:
        lines.append(f"\n# {role.role} ({role.user}): {role.description}")
        if role.role == "agent" and not agent_ids:
            lines.append("# one user per agent, named after its agent id: replace AGENT_ID")
        lines.append(role.shell(vhost))
    return "\n".join(lines) + "\n"
