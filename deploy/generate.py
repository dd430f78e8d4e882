"""The broker configuration of ``deploy/``, generated from ``broker.topology``.

    python deploy/generate.py            rewrite rabbitmq.conf, enabled_plugins and
                                         definitions.json beside this script
    python deploy/generate.py --check    exit 1 if any of them differs (for CI)
    python deploy/generate.py install --definitions FILE --out DIR
                                         what docker-compose.yml's rabbitmq-definitions
                                         service runs before RabbitMQ starts

``definitions.json`` is exactly what the bus declares for prefix
``orchestrator``: ``Topology.definitions()`` (whatever it holds, so names
added there appear here on the next run) plus the retry tiers and the
vhost, with the arguments ``broker/rabbitmq.py`` declares them with, so that
the bus's own declares succeed against it. Capability queues other than
``@any`` depend on the tasks submitted and are declared by the bus on first use.

Users are not in ``definitions.json``: it is checked in, and a password (even
hashed) does not belong there. But with definitions to load, RabbitMQ creates
neither the default vhost nor the default user, so ``install`` writes them at
start into the definitions directory the broker loads: ``topology.json`` (a
copy of ``definitions.json``) and ``users.json``, the user ``RABBITMQ_USER``
(default ``orchestrator``) with a salted SHA-256 hash of ``RABBITMQ_PASSWORD``,
as RabbitMQ hashes passwords itself.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import the project beside us
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.topology import RETRY_TIERS_MS, Topology

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

USER_TAGS = ("administrator",)
"""One user for the orchestrator, the agents and the management UI (see README.md)."""

HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
"""RabbitMQ's default since 3.6."""

FILES = ("rabbitmq.conf", "enabled_plugins", "definitions.json")


# --- definitions -----------------------------------------------------------------------


def vhost_entry(vhost: str = VHOST) -> dict[str, Any]:
    description = VHOST_DESCRIPTION if vhost == "/" else "rabbit-task-orchestrator"
    return {"name": vhost, "description": description, "tags": []}


def _exchange(name: str, kind: str, vhost: str) -> dict[str, Any]:
    # As RabbitMQBus declares exchanges: declare_exchange(name, kind, durable=True).
    return {
        "name": name,
        "vhost": vhost,
        "type": kind,
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": {},
    }


def _queue(name: str, arguments: dict[str, Any], vhost: str) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": vhost,
        "durable": True,
        "auto_delete": False,
        "arguments": arguments,
    }


def _binding(source: str, queue: str, key: str, vhost: str) -> dict[str, Any]:
    return {
        "source": source,
        "vhost": vhost,
        "destination": queue,
        "destination_type": "queue",
        "routing_key": key,
        "arguments": {},
    }


def _identity(section: str, entry: dict[str, Any]) -> tuple[Any, ...]:
    if section == "bindings":
        return (
            entry["vhost"],
            entry["source"],
            entry["destination_type"],
            entry["destination"],
            entry["routing_key"],
        )
    return (entry["vhost"], entry["name"])


def _add(document: dict[str, Any], section: str, entry: dict[str, Any]) -> None:
    """Append ``entry`` unless the section has it already (Topology may list it one day)."""
    entries = document.setdefault(section, [])
    if all(_identity(section, e) != _identity(section, entry) for e in entries):
        entries.append(entry)


def definitions(prefix: str = PREFIX, vhost: str = VHOST) -> dict[str, Any]:
    """The definitions document of a deployment: what the bus declares, pre-declared.

    ``Topology.definitions()`` as it stands (the fixed exchanges and queues,
    ``@any``, and whatever else it holds), the vhost, and every retry tier:
    a fanout exchange ``<p>.retry.<ms>`` bound to a TTL queue of the same name
    that dead-letters to ``<p>.tasks``, as ``RabbitMQBus._declare_retry_tier``
    declares them.
    """
    topology = Topology(prefix)
    document: dict[str, Any] = {"vhosts": [vhost_entry(vhost)]}
    for key, value in copy.deepcopy(topology.definitions(vhost)).items():
        if key == "vhosts":
            for entry in value:
                _add(document, "vhosts", entry)
        else:
            document[key] = value
    for tier in RETRY_TIERS_MS:
        _add(document, "exchanges", _exchange(topology.retry_exchange(tier), "fanout", vhost))
        _add(
            document,
            "queues",
            _queue(topology.retry_queue(tier), topology.retry_queue_arguments(tier), vhost),
        )
        _add(
            document,
            "bindings",
            _binding(topology.retry_exchange(tier), topology.retry_queue(tier), "", vhost),
        )
    return document


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

# An agent acknowledges a task only after its final event is confirmed, so each
# task is an unacknowledged delivery for as long as it runs. A delivery
# unacknowledged for longer than consumer_timeout (30 min by default) makes
# RabbitMQ close the agent's task channel and requeue every delivery on it: all
# of that agent's running tasks would start again elsewhere, and a task longer
# than the timeout would never finish. {hours} h leaves room for tasks whose `timeout`
# is up to a day; a stuck handler is still caught by the task's own timeout.
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


def users_definitions(
    username: str, password: str, vhosts: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The vhosts and one user with every permission on them, for import at boot."""
    if not username:
        raise ValueError("RABBITMQ_USER: must not be empty")
    if not password:
        raise ValueError("RABBITMQ_PASSWORD: must be set (see deploy/.env.example)")
    vhosts = vhosts or [vhost_entry()]
    return {
        "users": [
            {
                "name": username,
                "password_hash": password_hash(password),
                "hashing_algorithm": HASHING_ALGORITHM,
                "tags": list(USER_TAGS),
            }
        ],
        # The vhosts again: the files of a directory are imported in no set order.
        "vhosts": vhosts,
        "permissions": [
            {"user": username, "vhost": v["name"], "configure": ".*", "write": ".*", "read": ".*"}
            for v in vhosts
        ],
    }


def install(source: Path, out: Path, username: str, password: str) -> list[Path]:
    """Fill the broker's definitions directory: ``topology.json`` and ``users.json``.

    The user gets every permission on the vhosts of ``source`` (``/`` if it names
    none). RabbitMQ imports every file of that directory (sorted by name, whatever
    its extension), so nothing else should be written there.
    """
    topology = json.loads(source.read_text())  # fails here, not in the broker, if broken
    users = users_definitions(username, password, topology.get("vhosts"))
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
                os.environ.get("RABBITMQ_USER", "orchestrator"),
                os.environ.get("RABBITMQ_PASSWORD", ""),
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
