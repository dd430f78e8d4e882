"""deploy/k8s: valid Kubernetes, and in step with the code it deploys.

The manifests are generated (deploy/kubernetes.py); these tests hold the
committed files to the generator, every manifest to the Kubernetes schemas
(kubernetes-validate, strict: an unknown field fails), and the parts that
must agree with the code to the code: the queues KEDA scales on, grace
periods above the agents' drain timeout, probe paths, and settings names.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import kubernetes_validate
import pytest
import yaml

from agents.handlers import ANY_TASK_TYPE
from broker import BusSettings
from broker.routing import covers, route_key
from broker.topology import Topology
from deploy import kubernetes
from orchestrator.cli.settings import CliSettings
from tests.deployment import management_api

K8S = Path(kubernetes.__file__).resolve().parent / "k8s"
KUBERNETES_VERSION = "1.29.0"
"""The oldest release still in wide use that has every API used here."""


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in manifests() if doc["kind"] == kind]


def containers() -> list[dict[str, Any]]:
    return [c for d in of_kind("Deployment") for c in d["spec"]["template"]["spec"]["containers"]]


def test_committed_manifests_are_what_the_generator_writes() -> None:
    assert kubernetes.main(["--check"]) == 0, "run python deploy/kubernetes.py"


@pytest.mark.parametrize(
    "doc", [d for d in manifests() if not d["apiVersion"].startswith("keda.sh/")],
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)  # fmt: skip
def test_every_manifest_is_valid_kubernetes(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_agents_are_given_longer_than_their_drain_timeout() -> None:
    agents = kubernetes.example_agents()
    for deployment in of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        if not name.startswith("agent-"):
            continue
        agent = agents[name.removeprefix("agent-")]
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > agent.drain_timeout, name


def test_keda_scales_each_agent_on_exactly_the_queues_it_consumes() -> None:
    topology = Topology(kubernetes.PREFIX)
    agents = kubernetes.example_agents()
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in of_kind("ScaledObject")}
    assert set(scaled) == {f"agent-{role}" for role in agents}
    every_capability = sorted({c for a in agents.values() for c in a.capabilities})
    for role, agent in agents.items():
        (trigger,) = scaled[f"agent-{role}"]["spec"]["triggers"]
        pattern = re.compile(trigger["metadata"]["queueName"])
        own = agent.capabilities
        needs = [
            *(list(s) for n in range(len(own) + 1) for s in itertools.combinations(own, n)),
            [*own, "gpu"], ["gpu"], [*own[:1], "gpu"], every_capability,
        ]  # fmt: skip
        for other_role, other in agents.items():
            for task_type in other.task_types:
                for caps in needs:
                    queue = topology.task_queue(route_key(task_type, caps))
                    consumed = other_role == role and covers(own, caps)
                    assert bool(pattern.match(queue)) == consumed, (role, queue)
        assert not pattern.match(topology.rpc_queue)
        assert not pattern.match(topology.orchestrator_events_queue)


def test_an_any_type_agent_is_scaled_on_the_keys_it_covers_of_every_type() -> None:
    topology = Topology(kubernetes.PREFIX)
    pattern = re.compile(kubernetes.queue_pattern(topology, [ANY_TASK_TYPE], ["gpu", "pdf"]))
    for task_type in ("report", "a.b", "x" * 80):
        for caps, consumed in (
            ([], True), (["pdf"], True), (["gpu", "pdf"], True),
            (["gpu", "pdf", "csv"], False), (["csv"], False),
        ):  # fmt: skip
            queue = topology.task_queue(route_key(task_type, caps))
            assert bool(pattern.match(queue)) == consumed, queue


@pytest.mark.rabbitmq
def test_rabbitmq_lists_for_the_pattern_exactly_the_queues_the_agent_consumes(
    prefix: str,
) -> None:
    """KEDA hands ``queueName`` to the management API (``/api/queues?use_regex=true``),
    so RabbitMQ's regex engine, not Python's, decides which queues it sums."""
    api = management_api()
    topology = Topology(prefix)
    consumed = [route_key("analysis", caps) for caps in ([], ["pdf"], ["gpu-2"], ["gpu-2", "pdf"])]
    others = [
        route_key("analysis", caps) for caps in (["csv"], ["csv", "pdf"], ["gpu-2", "pdf", "x"])
    ] + [route_key("trading", []), route_key("analysis_x", ["pdf"])]
    names = [topology.task_queue(key) for key in consumed + others]
    try:
        for name in names:
            status, body = api.call("PUT", f"/api/queues/%2F/{quote(name, safe='')}", {})
            assert status < 300, body
        pattern = kubernetes.queue_pattern(topology, ["analysis"], ["pdf", "gpu-2"])
        query = urlencode(  # as KEDA asks (its rabbitmq scaler, useRegex)
            {
                "page": 1,
                "use_regex": "true",
                "pagination": "false",
                "name": pattern,
                "page_size": 100,
            }
        )
        status, listed = api.call("GET", f"/api/queues/%2F?{query}")
        assert status == 200, listed
        assert sorted(q["name"] for q in listed["items"]) == sorted(
            topology.task_queue(key) for key in consumed
        )
    finally:
        for name in names:
            api.call("DELETE", f"/api/queues/%2F/{quote(name, safe='')}")


def allowed_disruptions(budget: dict[str, Any], healthy: int) -> int:
    """What Kubernetes computes for a budget with ``healthy`` ready pods of ``healthy`` desired."""
    spec = budget["spec"]
    if "maxUnavailable" in spec:
        desired_healthy = healthy - int(spec["maxUnavailable"])
    else:
        desired_healthy = int(spec["minAvailable"])
    return max(0, healthy - desired_healthy)


def test_a_drain_evicts_one_pod_at_a_time_and_is_never_blocked() -> None:
    budgets = {d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]: d
               for d in of_kind("PodDisruptionBudget")}  # fmt: skip
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc["spec"] for doc in of_kind("ScaledObject")}
    deployments = of_kind("Deployment")
    assert set(budgets) == {d["metadata"]["name"] for d in deployments}
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == name
        keda = scaled.get(name)
        replicas = deployment["spec"]["replicas"]
        counts = range(keda["minReplicaCount"], keda["maxReplicaCount"] + 1) if keda else [replicas]
        # Down to one replica (an agent at KEDA's minimum, serve scaled down), and at each count
        for n in sorted({1, *counts}):
            allowed = allowed_disruptions(budgets[name], n)
            assert allowed >= 1, f"{name}: a drain waits forever at {n} replica(s)"
            if n > 1:
                assert allowed == 1, f"{name}: {allowed} of {n} may go at once"
    # serve: one leading, one standing by; evicting either leaves the other to hold the lease
    orchestrator = next(d for d in deployments if d["metadata"]["name"] == "orchestrator")
    assert orchestrator["spec"]["replicas"] == 2
    assert 2 - allowed_disruptions(budgets["orchestrator"], 2) == 1


def test_probes_and_settings_are_the_ones_the_processes_have() -> None:
    known = {
        f"ORCHESTRATOR_{name.upper()}"
        for model in (BusSettings, CliSettings)
        for name in model.model_fields
    }
    for container in containers():
        args = container["args"]
        port = int(args[args.index("--metrics-port") + 1])
        assert container["ports"] == [{"name": "metrics", "containerPort": port}]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for env in container["env"]:
            if env["name"].startswith("ORCHESTRATOR_"):
                assert env["name"] in known, env["name"]


def test_credentials_come_from_the_secret_and_nowhere_else() -> None:
    (secret,) = of_kind("Secret")
    keys = set(secret["stringData"])
    for container in containers():
        for env in container["env"]:
            assert "CHANGE-ME" not in str(env.get("value", ""))
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in keys
    (auth,) = of_kind("TriggerAuthentication")
    assert {ref["key"] for ref in auth["spec"]["secretTargetRef"]} <= keys


def test_the_flags_the_manifests_pass_are_the_commands_own() -> None:
    import subprocess
    import sys

    for container in containers():
        args = container["args"]
        command = args[: args.index("--metrics-port")]
        if command[:2] == ["agent", "run"]:
            command = command[:2]
        shown = subprocess.run(
            [sys.executable, "-m", "orchestrator", *command, "--help"],
            capture_output=True, text=True, timeout=60,
            env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert "--metrics-port" in shown.stdout, command


def test_keda_counts_the_digest_queues_of_part_of_a_long_capability_set() -> None:
    # Ten long capabilities: the keys of large parts of them are digests, which
    # the orchestrator tells the agent how to read (ConsumeQueues.digests)
    caps = [f"capability-long-{n:02d}" for n in range(10)]
    part = route_key("job", caps[:-1]).rpartition(".")[2]
    assert part.startswith("sha1-")
    keys = kubernetes.covered_keys(caps)
    assert part in keys
    assert route_key("job", [*caps[:-1], "other"]).rpartition(".")[2] not in keys
