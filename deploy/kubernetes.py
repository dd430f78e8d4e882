"""Kubernetes manifests for ``deploy/k8s/``, generated from the topology and the example agents.

    python deploy/kubernetes.py            rewrite deploy/k8s/*.yaml
    python deploy/kubernetes.py --check    exit 1 if any of them differs (for CI)

Generated rather than written by hand because three things in them must agree
with the code, and a hand-kept copy drifts: the names of the task queues KEDA
scales on (``broker.topology``: the queues of the task types each agent
handles whose capability keys it covers, and no other), the grace period a pod gets on SIGTERM (above the agent's drain
timeout, or Kubernetes kills handlers mid-task), and the settings and probe
paths the processes read and serve (``ORCHESTRATOR_*``, ``/healthz``,
``/readyz``). ``tests/test_kubernetes.py`` checks each against the code and
validates every manifest against the Kubernetes schemas.

What they run: ``orchestrator serve`` as two replicas sharing a PostgreSQL
store, one leading and one standing by (the broker lease decides; the
standby reads ready, so a rolling update never leaves the prefix without a
leader for longer than a takeover); each example agent as a Deployment that
KEDA scales on the depth of its queues; PodDisruptionBudgets so a node drain
evicts one pod of each at a time (and is never blocked at one replica); broker and store credentials from a Secret.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path
from typing import Any

import yaml

if __package__ in (None, ""):  # run as a script: import the project beside us
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents import Agent
from agents.handlers import ANY_TASK_TYPE
from agents.trust import can_run_key
from broker.routing import capability_key, route_key
from broker.topology import Topology

HERE = Path(__file__).resolve().parent
OUT = HERE / "k8s"

PREFIX = "orchestrator"
IMAGE = "rabbit-task-orchestrator:latest"
METRICS_PORT = 9100
"""Where serve and agents serve /metrics, /healthz and /readyz (``--metrics-port``)."""
GRACE_MARGIN = 15
"""Seconds beyond an agent's drain timeout before Kubernetes sends SIGKILL."""
SECRET = "orchestrator-credentials"
LABELS = {"app.kubernetes.io/part-of": "rabbit-task-orchestrator"}


def example_agents() -> dict[str, Agent]:
    """The agents of ``deploy/example_agents.py``, by role."""
    from deploy import example_agents

    return {
        "analyst": example_agents.analyst,
        "risk": example_agents.risk,
        "trader": example_agents.trader,
    }


MAX_LISTED_CAPABILITIES = 10
"""Above this many capabilities the covered keys (2**n of them) would make the regex huge."""


def covered_keys(capabilities: list[str]) -> list[str]:
    """The capability keys of the task queues an agent with ``capabilities`` consumes.

    Every subset's ``capability_key`` (``@any`` for the empty one), as the
    orchestrator and ``covers`` place tasks: a task needing more than the
    agent has sits in a queue the agent never consumes (``broker.covers``), and
    scaling the agent on it would add replicas that cannot run it. A subset
    whose key is written as a digest (over 119 characters) is in too: the
    orchestrator tells the agent what it stands for (``ConsumeQueues.digests``).
    """
    caps = sorted(set(capabilities))
    if len(caps) > MAX_LISTED_CAPABILITIES:
        raise ValueError(
            f"{len(caps)} capabilities: over {MAX_LISTED_CAPABILITIES}, the KEDA pattern"
            " listing every covered key would be too long"
        )
    subsets = (s for n in range(len(caps) + 1) for s in itertools.combinations(caps, n))
    # The agent's own test of a queue key, told what a digest stands for.
    keys = {
        capability_key(subset)
        for subset in subsets
        if can_run_key(f"any.{capability_key(subset)}", caps, [ANY_TASK_TYPE], subset)
    }
    return sorted(keys)


def queue_pattern(topology: Topology, task_types: list[str], capabilities: list[str]) -> str:
    """A regex matching exactly the task queues an agent consumes: those of its task
    types whose capability key it covers (``covered_keys``).

    A queue is ``<prefix>.tasks.<task type>.<capability key>``
    (``Topology.task_queue`` of ``route_key``), and a capability key never
    holds a '.', so the key is what follows the last dot. KEDA hands the
    pattern to RabbitMQ's management API (``/api/queues?use_regex=true``),
    whose regex engine reads ``re.escape``'s escapes as Python does
    (``tests/test_kubernetes.py`` asks a real broker).
    """
    head = re.escape(topology.task_queue(""))
    keys = "|".join(re.escape(k) for k in covered_keys(capabilities))
    if ANY_TASK_TYPE in task_types:
        return f"^{head}.+\\.({keys})$"
    # As the queue names write them: a type outside the safe alphabet is a digest.
    parts = sorted({route_key(t, ()).rsplit(".", 1)[0] for t in task_types})
    return f"^{head}({'|'.join(re.escape(p) for p in parts)})\\.({keys})$"


def _probes() -> dict[str, Any]:
    def probe(path: str, period: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": "metrics"},
            "periodSeconds": period,
            "failureThreshold": 3,
        }

    return {"livenessProbe": probe("/healthz", 10), "readinessProbe": probe("/readyz", 5)}


def _secret_env(name: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": key}}}


def _container(name: str, args: list[str], env: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "image": IMAGE,
        "args": [*args, "--metrics-port", str(METRICS_PORT)],
        "env": [{"name": "ORCHESTRATOR_PREFIX", "value": PREFIX}, *env],
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
        **_probes(),
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
    }


def _deployment(
    name: str, replicas: int, container: dict[str, Any], grace: int, strategy: dict[str, Any]
) -> dict[str, Any]:
    labels = {**LABELS, "app.kubernetes.io/name": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "strategy": strategy,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"terminationGracePeriodSeconds": grace, "containers": [container]},
            },
        },
    }


def _budget(name: str) -> dict[str, Any]:
    """One pod at a time may be evicted, however many there are.

    ``maxUnavailable: 1`` rather than ``minAvailable: 1``: the latter allows
    no eviction at all at one replica (an agent KEDA has scaled to its
    minimum, or serve scaled down), so a node drain waits forever. For serve,
    one leader and one standby, it still keeps one of the two while the
    other is evicted: evicting the leader hands the lease to the standby, and
    never both go at once.
    """
    selector = {"matchLabels": {"app.kubernetes.io/name": name}}
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "labels": LABELS},
        "spec": {"maxUnavailable": 1, "selector": selector},
    }


def orchestrator_manifests() -> list[dict[str, Any]]:
    container = _container(
        "orchestrator",
        ["serve"],
        [
            _secret_env("ORCHESTRATOR_BROKER_URL", "orchestrator-broker-url"),
            _secret_env("ORCHESTRATOR_STORE", "store-url"),
        ],
    )
    # Surge, never a gap: the new pod stands by until the old one's lease ends.
    rolling = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "orchestrator-metrics", "labels": LABELS},
        "spec": {
            "selector": {"app.kubernetes.io/name": "orchestrator"},
            "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}],
        },
    }
    return [
        _deployment("orchestrator", 2, container, 30, rolling),
        _budget("orchestrator"),
        service,
    ]


def agent_manifests(role: str, agent: Agent, topology: Topology) -> list[dict[str, Any]]:
    name = f"agent-{role}"
    container = _container(
        name,
        ["agent", "run", f"deploy.example_agents:{role}"],
        [
            _secret_env("ORCHESTRATOR_BROKER_URL", "agent-broker-url"),
            {"name": "AGENT_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
    )
    grace = int(agent.drain_timeout) + GRACE_MARGIN
    rolling = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    scaled = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": name, "labels": LABELS},
        "spec": {
            "scaleTargetRef": {"name": name},
            "minReplicaCount": 1,
            "maxReplicaCount": 10,
            "triggers": [
                {
                    "type": "rabbitmq",
                    "metadata": {
                        "protocol": "http",
                        "mode": "QueueLength",
                        # Ready tasks one replica should have waiting: its concurrency.
                        "value": str(agent.max_concurrent_tasks),
                        "useRegex": "true",
                        "operation": "sum",
                        "queueName": queue_pattern(
                            topology, agent_task_types(agent), agent.capabilities
                        ),
                        "vhostName": "/",
                    },
                    "authenticationRef": {"name": "rabbitmq-monitor"},
                }
            ],
        },
    }
    return [_deployment(name, 1, container, grace, rolling), _budget(name), scaled]


def agent_task_types(agent: Agent) -> list[str]:
    return list(agent.task_types)


def shared_manifests() -> list[dict[str, Any]]:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET, "labels": LABELS},
        "type": "Opaque",
        # Replace before applying (or create the Secret from your vault): each
        # process gets the user of its role (see `orchestrator topology`).
        "stringData": {
            "orchestrator-broker-url": "amqp://orchestrator:CHANGE-ME@rabbitmq:5672/",
            "agent-broker-url": "amqp://agent:CHANGE-ME@rabbitmq:5672/",
            "store-url": "postgresql://orchestrator:CHANGE-ME@postgres:5432/orchestrator",
            "monitor-management-url": "http://monitor:CHANGE-ME@rabbitmq:15672/",
        },
    }
    auth = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": "rabbitmq-monitor", "labels": LABELS},
        "spec": {
            "secretTargetRef": [
                {"parameter": "host", "name": SECRET, "key": "monitor-management-url"}
            ]
        },
    }
    return [secret, auth]


class _Dumper(yaml.SafeDumper):
    """Writes repeated values out in full: ``&id001`` anchors confuse readers and kubectl diffs."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render() -> dict[str, str]:
    """File name -> YAML text of every manifest file."""
    topology = Topology(PREFIX)
    files = {
        "credentials.yaml": shared_manifests(),
        "orchestrator.yaml": orchestrator_manifests(),
    }
    for role, agent in example_agents().items():
        files[f"agent-{role}.yaml"] = agent_manifests(role, agent, topology)
    header = "# Generated by deploy/kubernetes.py from the code: edit that, then run it.\n"
    return {
        name: header + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=100)
        for name, docs in files.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file differs")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            OUT.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"deploy/k8s is stale ({', '.join(stale)}): run python deploy/kubernetes.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
