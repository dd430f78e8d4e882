"""The broker configuration of ``deploy/``, generated from ``broker.topology``.

    python deploy/generate.py            rewrite rabbitmq.conf, enabled_plugins and
                                         definitions.json beside this script
    python deploy/generate.py --check    exit 1 if any of them differs (for CI)
    python deploy/generate.py install --definitions FILE --out DIR
                                         what docker-compose.yml's rabbitmq-definitions
                                         service runs before RabbitMQ starts

``definitions.json`` is exactly what the bus declares for prefix
``orchestrator``, and the vhost: ``Topology.definitions()``, rendered from the
very exchange, queue and binding objects of ``broker/topology.py`` that the
bus declares (whatever they hold, so names added there appear here on the
next run), so that the bus's own declares succeed against it. Capability
queues other than ``@any`` depend on the tasks submitted and are declared by
the bus on first use.

Users are not in ``definitions.json``: it is checked in, and a password (even
hashed) does not belong there. But with definitions to load, RabbitMQ creates
neither the default vhost nor the default user, so ``install`` writes them at
start into the definitions directory the broker loads: ``topology.json`` (a
copy of ``definitions.json``) and ``users.json``, one user per role, each with
a salted SHA-256 hash of its password (as RabbitMQ hashes passwords itself)
and the permissions ``broker.permissions`` derives for its role:

- ``RABBITMQ_USER`` (default ``operator``, password ``RABBITMQ_PASSWORD``): the
  operator, for the management UI; the only one with the ``administrator`` tag;
- ``orchestrator`` (``ORCHESTRATOR_PASSWORD``): ``orchestrator serve``, which
  alone declares the shared topology;
- one user per example agent, named after it (``analyst``, ``risk``,
  ``trader``; ``ANALYST_PASSWORD``...), which also runs its replicas
  ``<name>-<host>``;
- ``client`` and ``monitor`` (``CLIENT_PASSWORD``, ``MONITOR_PASSWORD``), for
  services that submit and for ``orchestrator watch``: made only if their
  password is set.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import the project beside us
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import permissions as role_permissions
from broker.topology import Topology

HERE = Path(__file__).resolve().parent

PREFIX = "orchestrator"
"""The prefix of the deployment (``ORCHESTRATOR_PREFIX`` in docker-compose.yml)."""

VHOST = "/"
VHOST_DESCRIPTION = "Default virtual host"
"""What RabbitMQ calls ``/`` when it creates it: importing it changes nothing."""

DEFINITIONS_DIR = "/etc/rabbitmq/definitions.d"
"""Where the broker container finds its definitions (a volume; see docker-compose.yml)."""

CONSUMER_TIMEOUT_MS = 24 * 60 * 60 * 1000
"""24 h: see the comment written into rabbitmq.conf."""

PLUGINS = ("rabbitmq_management", "rabbitmq_prometheus")

MANAGEMENT_PORT = 15672
PROMETHEUS_PORT = 15692

OPERATOR_TAGS = ("administrator",)
"""The operator's user alone has a tag: the management UI; every other user has none."""

OPERATOR = "operator"
"""Default name of the operator's user (``RABBITMQ_USER``)."""

AGENTS = ("analyst", "risk", "trader")
"""The example agents' users (docker-compose.yml's services), each running its replicas."""

OPTIONAL_ROLES = ("client", "monitor")
"""Made only if their password is set."""

HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
"""RabbitMQ's default since 3.6."""

FILES = ("rabbitmq.conf", "enabled_plugins", "definitions.json")


# --- definitions -----------------------------------------------------------------------


def vhost_entry(vhost: str = VHOST) -> dict[str, Any]:
    description = VHOST_DESCRIPTION if vhost == "/" else "rabbit-task-orchestrator"
    return {"name": vhost, "description": description, "tags": []}


def definitions(prefix: str = PREFIX, vhost: str = VHOST, quorum: bool = False) -> dict[str, Any]:
    """The definitions document of a deployment: what the bus declares, pre-declared.

    ``Topology.definitions()`` (the fixed exchanges and queues, ``@any``, the
    request queue, the retry tiers: ``Topology.everything()``) with the vhost
    they live in. ``quorum``: the orchestrator's own queues as quorum queues, as
    ``ORCHESTRATOR_QUORUM_QUEUES=true`` declares them (a cluster's; the files
    written here are the single broker's, classic).
    """
    topology = Topology(prefix, quorum=quorum)
    return {"vhosts": [vhost_entry(vhost)], **topology.definitions(vhost)}


# --- rabbitmq.conf and enabled_plugins ---------------------------------------------------


def rabbitmq_conf() -> str:
    hours = CONSUMER_TIMEOUT_MS // 3_600_000
    return f"""\
# Generated by deploy/generate.py from broker/topology.py: edit that script and run
#   python deploy/generate.py
# RabbitMQ 3.10; docker-compose.yml mounts this file at /etc/rabbitmq/rabbitmq.conf.

# Definitions imported at every boot, before the client listeners open: every
# file in this directory, which the rabbitmq-definitions service fills at start
# (topology.json: a copy of definitions.json; users.json: the vhost and the user
# whose password is RABBITMQ_PASSWORD, hashed). With definitions to load,
# RabbitMQ creates no default vhost and no guest user.
load_definitions = {DEFINITIONS_DIR}

# A task whose `timeout` is at most the agent's long_task_after (1500 s by
# default) is acknowledged only after its final event is confirmed: it is an
# unacknowledged delivery while it runs. A longer task is acknowledged once it
# has started (the orchestrator re-publishes it if its agent dies). A delivery
# unacknowledged longer than consumer_timeout (30 min by default) makes RabbitMQ
# close the agent's task channel and requeue every delivery on it, so that all
# of that agent's running tasks start again elsewhere. {hours} h is a margin
# above that: for a task that overruns its timeout, and for agents built with
# long_task_after=None (or a value above 30 min), whose tasks are held
# unacknowledged to the end; then it bounds their `timeout` to about a day.
consumer_timeout = {CONSUMER_TIMEOUT_MS}

listeners.tcp.default = 5672
management.tcp.port = {MANAGEMENT_PORT}
prometheus.tcp.port = {PROMETHEUS_PORT}

# Message rates and per-queue statistics in the management UI (the image without
# "-management" turns the collector off in conf.d).
management_agent.disable_metrics_collector = false
"""


def enabled_plugins() -> str:
    return f"[{','.join(PLUGINS)}].\n"


def render(prefix: str = PREFIX) -> dict[str, str]:
    """The text of every generated file, by file name."""
    return {
        "rabbitmq.conf": rabbitmq_conf(),
        "enabled_plugins": enabled_plugins(),
        "definitions.json": json.dumps(definitions(prefix), indent=2) + "\n",
    }


def write(directory: Path = HERE) -> list[Path]:
    written = []
    for name, text in render().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def stale(directory: Path = HERE) -> list[str]:
    """The generated files whose content differs from what would be generated now."""
    differ = []
    for name, text in render().items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            differ.append(name)
    return differ


# --- users (written at start, never checked in) ------------------------------------------


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4) if salt is None else salt
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def password_variable(user: str) -> str:
    """The environment variable that holds a role user's password (``ANALYST_PASSWORD``)."""
    return re.sub(r"[^A-Z0-9]", "_", user.upper()) + "_PASSWORD"


def role_users(
    prefix: str = PREFIX, user_prefix: str = ""
) -> dict[str, role_permissions.RolePermissions]:
    """Every user of the deployment but the operator, with its role's permissions,
    by its name without ``user_prefix`` (which tests use to keep theirs apart)."""
    topology = Topology(prefix)
    users = {
        "orchestrator": role_permissions.orchestrator(topology, f"{user_prefix}orchestrator"),
        **{
            name: role_permissions.agent(topology, f"{user_prefix}{name}", replicas=True)
            for name in AGENTS
        },
    }
    for role in OPTIONAL_ROLES:
        users[role] = role_permissions.role_permissions(topology, role, f"{user_prefix}{role}")
    return users


def passwords_from(environ: Mapping[str, str]) -> dict[str, str]:
    """The role users' passwords from their variables, by user name (unset
    optional roles left out); a required one unset is a ``ValueError``."""
    found = {}
    for name in role_users():
        password = environ.get(password_variable(name), "")
        if not password and name in OPTIONAL_ROLES:
            continue
        if not password:
            raise ValueError(f"{password_variable(name)}: must be set (see deploy/.env.example)")
        found[name] = password
    return found


def user_entry(name: str, password: str, tags: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "name": name,
        "password_hash": password_hash(password),
        "hashing_algorithm": HASHING_ALGORITHM,
        "tags": list(tags),
    }


def users_definitions(
    operator: str,
    password: str,
    passwords: Mapping[str, str],
    vhosts: list[dict[str, Any]] | None = None,
    prefix: str = PREFIX,
    user_prefix: str = "",
) -> dict[str, Any]:
    """The vhosts, the operator (administrator, every permission) and each role
    user of ``passwords`` (by name without ``user_prefix``) with exactly its
    role's permissions and no tag, for import at boot."""
    if not operator:
        raise ValueError("RABBITMQ_USER: must not be empty")
    if not password:
        raise ValueError("RABBITMQ_PASSWORD: must be set (see deploy/.env.example)")
    vhosts = vhosts or [vhost_entry()]
    known = role_users(prefix, user_prefix)
    unknown = sorted(set(passwords) - set(known))
    if unknown:
        raise ValueError(f"no role user {unknown[0]!r}: the users are {', '.join(known)}")
    roles = {name: known[name] for name in passwords}
    if operator in {r.user for r in roles.values()}:
        raise ValueError(f"RABBITMQ_USER: {operator!r} is a role's user; the operator is another")
    users = [user_entry(operator, password, OPERATOR_TAGS)]
    users += [user_entry(r.user, passwords[name]) for name, r in roles.items()]
    permissions = [
        {"user": operator, "vhost": v["name"], "configure": ".*", "write": ".*", "read": ".*"}
        for v in vhosts
    ]
    topic_permissions = []
    for v in vhosts:
        for role in roles.values():
            exported = role.as_json(v["name"])
            permissions += exported["permissions"]
            topic_permissions += exported["topic_permissions"]
    return {
        "users": users,
        # The vhosts again: the files of a directory are imported in no set order.
        "vhosts": vhosts,
        "permissions": permissions,
        "topic_permissions": topic_permissions,
    }


def install(
    source: Path,
    out: Path,
    operator: str,
    password: str,
    passwords: Mapping[str, str] | None = None,
    prefix: str = PREFIX,
    user_prefix: str = "",
) -> list[Path]:
    """Fill the broker's definitions directory: ``topology.json`` and ``users.json``.

    The users get their role's permissions on the vhosts of ``source`` (``/`` if
    it names none). RabbitMQ imports every file of that directory (sorted by
    name, whatever its extension), so nothing else should be written there.
    """
    topology = json.loads(source.read_text())  # fails here, not in the broker, if broken
    users = users_definitions(
        operator, password, passwords or {}, topology.get("vhosts"), prefix, user_prefix
    )
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, document in (("topology.json", topology), ("users.json", users)):
        path = out / name
        path.write_text(json.dumps(document, indent=2) + "\n")
        path.chmod(0o644)  # the broker runs as another user
        written.append(path)
    return written


# --- command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python deploy/generate.py", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a generated file is out of date"
    )
    commands = parser.add_subparsers(dest="command")
    do_install = commands.add_parser(
        "install", help="write topology.json and users.json for the broker to load"
    )
    do_install.add_argument("--definitions", type=Path, default=HERE / "definitions.json")
    do_install.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.command == "install":
        try:
            written = install(
                args.definitions,
                args.out,
                os.environ.get("RABBITMQ_USER", OPERATOR),
                os.environ.get("RABBITMQ_PASSWORD", ""),
                passwords_from(os.environ),
            )
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
        return 0
    if args.check:
        differ = stale()
        if differ:
            print(
                f"out of date: {', '.join(differ)}; run python deploy/generate.py",
                file=sys.stderr,
            )
            return 1
        return 0
    for path in write():
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
