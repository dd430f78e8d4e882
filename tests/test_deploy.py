"""deploy/: the broker configuration is what the topology module generates, the
compose file agrees with it, and the definitions, loaded into a real broker
through its management API, are a topology the orchestrator runs on."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import yaml

from agents import Agent, TaskContext, load_agent
from broker import BusSettings, RabbitMQBus
from broker.errors import BusConnectionError
from broker.routing import ANY_CAPABILITY_KEY
from broker.topology import RETRY_TIERS_MS, Topology
from deploy import generate
from tests.conftest import BROKER_URL
from tests.deployment import Deployment, management_api
from tests.harness import Harness

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"


def read_conf() -> dict[str, str]:
    """rabbitmq.conf's ``key = value`` lines (sysctl format, no repeated keys here)."""
    conf = {}
    for line in (DEPLOY / "rabbitmq.conf").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            conf[key.strip()] = value.strip()
    return conf


def load_compose() -> dict[str, Any]:
    """docker-compose.yml parsed, merge keys resolved."""
    return yaml.safe_load(COMPOSE.read_text())


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's volumes: target path -> source (file, directory or named volume)."""
    found = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        found[target] = source
    return found


# ----------------------------------------------------------------- generated files


def test_generated_files_are_what_generate_py_writes_now() -> None:
    # When the topology changes (a queue added to Topology.definitions(), an
    # argument changed), this fails until `python deploy/generate.py` is run.
    for name, text in generate.render().items():
        assert (DEPLOY / name).read_text() == text, (
            f"deploy/{name} is out of date: run python deploy/generate.py"
        )
    assert generate.stale() == []
    check = subprocess.run(
        [sys.executable, "deploy/generate.py", "--check"], cwd=ROOT, capture_output=True
    )
    assert check.returncode == 0, check.stderr.decode()


def test_definitions_hold_everything_the_bus_declares_with_its_arguments() -> None:
    t = Topology("p")
    doc = generate.definitions("p")
    exchanges = {e["name"]: e for e in doc["exchanges"]}
    queues = {q["name"]: q for q in doc["queues"]}
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in doc["bindings"]}

    # Everything Topology.definitions() lists, whatever it lists (the rpc queue included)
    fixed = t.definitions()
    for section in ("exchanges", "queues", "bindings"):
        for entry in fixed[section]:
            assert entry in doc[section], entry
    assert queues[t.rpc_queue]["arguments"] == Topology.rpc_queue_arguments()
    # The @any task queue as declare_task_queue declares it, bound under its key
    assert queues[t.task_queue(ANY_CAPABILITY_KEY)]["arguments"] == (
        Topology.task_queue_arguments()
    )
    assert (t.tasks_exchange, t.task_queue(ANY_CAPABILITY_KEY), ANY_CAPABILITY_KEY) in bindings
    # Every retry tier as the bus declares it on a delayed publish
    for tier in RETRY_TIERS_MS:
        assert exchanges[t.retry_exchange(tier)]["type"] == "fanout"
        queue = queues[t.retry_queue(tier)]
        assert queue["arguments"] == t.retry_queue_arguments(tier)
        assert queue["arguments"]["x-dead-letter-exchange"] == t.tasks_exchange
        assert (t.retry_exchange(tier), t.retry_queue(tier), "") in bindings
    # Durable, never auto-deleted; each name once; all in the vhost
    for entry in [*doc["exchanges"], *doc["queues"]]:
        assert entry["durable"] is True and entry["auto_delete"] is False
        assert entry["vhost"] == "/"
    assert len(exchanges) == len(doc["exchanges"]) and len(queues) == len(doc["queues"])
    assert len(bindings) == len(doc["bindings"])
    assert [v["name"] for v in doc["vhosts"]] == ["/"]
    # No credentials in the checked-in file
    assert "users" not in doc and "permissions" not in doc
    assert "password" not in (DEPLOY / "definitions.json").read_text()


def test_enabled_plugins_is_an_erlang_list_of_management_and_prometheus() -> None:
    text = (DEPLOY / "enabled_plugins").read_text()
    assert re.fullmatch(r"\[[a-z_]+(,[a-z_]+)*\]\.\n", text)
    plugins = text.strip()[1:-2].split(",")
    assert "rabbitmq_management" in plugins and "rabbitmq_prometheus" in plugins


ROLE_PASSWORDS = {
    generate.password_variable(name): f"pw-{name}-{i}"
    for i, name in enumerate(generate.role_users())
}
"""A password for every role user (the optional ones included), as deploy/.env holds them."""


def test_users_file_holds_one_user_per_role_with_its_permissions(tmp_path: Path) -> None:
    source = tmp_path / "definitions.json"
    source.write_text(json.dumps(generate.definitions("p", vhost="/")))
    out = tmp_path / "definitions.d"
    command = ["deploy/generate.py", "install", "--definitions", str(source), "--out", str(out)]
    env = {**os.environ, "RABBITMQ_USER": "ops", "RABBITMQ_PASSWORD": "pa55-word"}
    result = subprocess.run(
        [sys.executable, *command], cwd=ROOT, env={**env, **ROLE_PASSWORDS}, capture_output=True
    )
    assert result.returncode == 0, result.stderr.decode()
    assert sorted(p.name for p in out.iterdir()) == ["topology.json", "users.json"]
    assert json.loads((out / "topology.json").read_text()) == json.loads(source.read_text())
    users = json.loads((out / "users.json").read_text())
    by_name = {u["name"]: u for u in users["users"]}

    # The operator alone is an administrator, with every permission
    assert by_name["ops"]["tags"] == ["administrator"]
    assert {"user": "ops", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"} in users[
        "permissions"
    ]
    # Every other user has no tag and exactly its role's permissions
    roles = generate.role_users(generate.PREFIX)
    assert set(by_name) == {"ops", *(r.user for r in roles.values())}
    for role in roles.values():
        assert by_name[role.user]["tags"] == []
        exported = role.as_json("/")
        mine = [p for p in users["permissions"] if p["user"] == role.user]
        topics = [p for p in users["topic_permissions"] if p["user"] == role.user]
        assert mine == exported["permissions"] and topics == exported["topic_permissions"]
        assert all(p["configure"] != ".*" for p in mine)
    # An agent's user runs its replicas <name>-<host> and publishes under their ids only
    analyst = next(p for p in users["topic_permissions"] if p["user"] == "analyst")
    keys = analyst["write"].replace("{username}", "analyst")
    assert re.search(keys, "task.finished.analyst-3f2a") and not re.search(keys, "task.x.risk")

    # Passwords are hashed as RabbitMQ hashes them, never written
    for name, user in by_name.items():
        secret = "pa55-word" if name == "ops" else ROLE_PASSWORDS[generate.password_variable(name)]
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        raw = base64.b64decode(user["password_hash"])
        assert raw[4:] == hashlib.sha256(raw[:4] + secret.encode()).digest()
        assert secret not in (out / "users.json").read_text()
    assert [v["name"] for v in users["vhosts"]] == ["/"]

    # Without a password it refuses, rather than create a user nobody can log in as
    for missing in ("RABBITMQ_PASSWORD", "ORCHESTRATOR_PASSWORD", "ANALYST_PASSWORD"):
        refused = subprocess.run(
            [sys.executable, "deploy/generate.py", "install", "--out", str(tmp_path / "x")],
            cwd=ROOT,
            env={k: v for k, v in {**env, **ROLE_PASSWORDS}.items() if k != missing},
            capture_output=True,
        )
        assert refused.returncode == 1 and missing.encode() in refused.stderr, missing
    # The optional users are left out when their password is
    optional = {k: v for k, v in ROLE_PASSWORDS.items() if k != "MONITOR_PASSWORD"}
    assert "monitor" not in generate.passwords_from(optional)


# --------------------------------------------------------------- rabbitmq.conf and compose


def test_rabbitmq_conf_raises_consumer_timeout_and_loads_the_mounted_definitions() -> None:
    conf = read_conf()
    # Above RabbitMQ's 30 min default, so that long tasks are not requeued mid-run
    assert int(conf["consumer_timeout"]) == generate.CONSUMER_TIMEOUT_MS
    assert int(conf["consumer_timeout"]) >= 24 * 3600 * 1000
    assert conf["load_definitions"] == generate.DEFINITIONS_DIR
    assert conf["management.tcp.port"] == "15672" and conf["prometheus.tcp.port"] == "15692"

    compose = load_compose()
    services = compose["services"]
    rabbitmq = services["rabbitmq"]
    assert rabbitmq["image"].startswith("rabbitmq:3.10-management")
    broker_mounts = mounts(rabbitmq)
    assert broker_mounts["/etc/rabbitmq/rabbitmq.conf"] == "./rabbitmq.conf"
    assert broker_mounts["/etc/rabbitmq/enabled_plugins"] == "./enabled_plugins"
    # The directory load_definitions names is the volume the init service fills
    # from ./definitions.json, before the broker starts
    volume = broker_mounts[conf["load_definitions"]]
    assert volume in compose["volumes"]
    init = services["rabbitmq-definitions"]
    assert init["entrypoint"] == ["python", "deploy/generate.py", "install"]
    args = dict(zip(init["command"][::2], init["command"][1::2], strict=True))
    init_mounts = mounts(init)
    assert init_mounts[args["--definitions"]] == "./definitions.json"
    assert init_mounts[args["--out"]] == volume
    assert rabbitmq["depends_on"]["rabbitmq-definitions"] == {
        "condition": "service_completed_successfully"
    }
    assert "healthcheck" in rabbitmq


def test_compose_runs_the_orchestrator_and_two_agents_from_one_image() -> None:
    text = COMPOSE.read_text()
    # The password comes from the environment (deploy/.env), never written down
    assert "${RABBITMQ_PASSWORD:?" in text
    example = (DEPLOY / ".env.example").read_text()
    assert re.search(r"^RABBITMQ_PASSWORD=$", example, re.MULTILINE)
    for name in ("generate.py", "example_agents.py", "definitions.json", "Dockerfile"):
        assert (DEPLOY / name).exists()

    compose = load_compose()
    services = compose["services"]
    images = {s.get("image") for n, s in services.items() if n != "rabbitmq"}
    assert images == {"rabbit-task-orchestrator:latest"}
    for service in services.values():
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).exists()
    orchestrator = services["orchestrator"]
    assert orchestrator["command"][:3] == ["serve", "--store", "sqlite:/data/state.sqlite"]
    assert "/data" in mounts(orchestrator)
    agents = {
        name: service["command"][2]
        for name, service in services.items()
        if service.get("command", [])[:2] == ["agent", "run"]
    }
    default = [name for name in agents if not services[name].get("profiles")]
    assert len(default) >= 2

    # Each process logs in as its role's user, whose password the init service
    # hashes into users.json: the orchestrator declares, agents declare their own
    init_env = services["rabbitmq-definitions"]["environment"]
    users = generate.role_users()
    for name in ["orchestrator", *agents]:
        environment = services[name]["environment"]
        assert environment["ORCHESTRATOR_PREFIX"] == generate.PREFIX
        url = environment["ORCHESTRATOR_BROKER_URL"]
        assert url.startswith(f"amqp://{users[name].user}:") and "@rabbitmq:5672/" in url
        variable = generate.password_variable(name)
        assert f"${{{variable}:?" in url and f"${{{variable}:?" in init_env[variable]
        assert services[name]["depends_on"]["rabbitmq"] == {"condition": "service_healthy"}
        if name == "orchestrator":
            assert environment["ORCHESTRATOR_DECLARE"] == "all"
        else:
            assert environment["ORCHESTRATOR_DECLARE"] == "own"
            assert environment["ORCHESTRATOR_ORCHESTRATOR_USER"] == users["orchestrator"].user
            assert users[name].role == "agent"
    # Every password install reads is passed to it, and written in .env.example
    for name in users:
        variable = generate.password_variable(name)
        assert variable in init_env
        assert re.search(rf"^{variable}=$", example, re.MULTILINE), variable
    specs = list(agents.values())
    # Every agent the compose file runs is an Agent object, with its own capabilities
    loaded = [load_agent(spec) for spec in specs]
    assert all(isinstance(agent, Agent) and agent.capabilities for agent in loaded)
    assert len({agent.agent_id for agent in loaded}) == len(loaded)


def test_dockerfile_builds_one_non_root_image_for_serve_and_agents() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert "RUN pip install ." in text
    assert re.search(r"^USER (?!root)\S+$", text, re.MULTILINE)
    assert 'ENTRYPOINT ["orchestrator"]' in text and 'CMD ["serve"]' in text
    # Only named deploy files go into the image: never deploy/.env and its password
    for line in text.splitlines():
        if line.startswith("COPY deploy"):
            assert "deploy/.env" not in line and not line.startswith("COPY deploy ")
    # What it copies exists
    for source in re.findall(r"^COPY ([^\n]+?) \S+/?$", text, re.MULTILINE):
        for path in source.replace("\\", " ").split():
            assert (ROOT / path).exists(), path


# ------------------------------------------------------------------- the real broker


def q(name: str) -> str:
    return quote(name, safe="")


@pytest.mark.rabbitmq
async def test_orchestrator_runs_on_definitions_loaded_through_the_management_api(
    prefix: str,
) -> None:
    # Given the deployment's definitions for this test's prefix, loaded as the
    # broker's operator would load them (the vhost "/" exists: left alone)
    api = management_api()
    document = generate.definitions(prefix)
    del document["vhosts"]
    settings = BusSettings(
        broker_url=BROKER_URL, prefix=prefix, amqp_heartbeat=5, connect_attempts=1
    )
    harness = Harness("rabbitmq", settings)
    try:
        status, body = await asyncio.to_thread(api.call, "POST", "/api/definitions", document)
        assert status in (200, 201, 204), body

        # Then every queue, exchange and binding is on the broker as written
        for queue in document["queues"]:
            status, info = await asyncio.to_thread(
                api.call, "GET", f"/api/queues/%2F/{q(queue['name'])}"
            )
            assert status == 200, queue["name"]
            assert info["arguments"] == queue["arguments"], queue["name"]
            assert info["durable"] is True and info["auto_delete"] is False
        for exchange in document["exchanges"]:
            status, info = await asyncio.to_thread(
                api.call, "GET", f"/api/exchanges/%2F/{q(exchange['name'])}"
            )
            assert status == 200 and info["type"] == exchange["type"], exchange["name"]
        for binding in document["bindings"]:
            path = f"/api/bindings/%2F/e/{q(binding['source'])}/q/{q(binding['destination'])}"
            status, found = await asyncio.to_thread(api.call, "GET", path)
            assert binding["routing_key"] in [b["routing_key"] for b in found], binding

        # And the bus declares the same names with the same arguments: no
        # PRECONDITION_FAILED on the fixed topology, @any, the rpc queue or any retry tier
        bus = harness.new_bus()
        await bus.connect()
        assert isinstance(bus, RabbitMQBus)
        await bus.declare(bus.topology.everything())

        # And the orchestrator runs tasks on it, a retry through a pre-declared tier included
        orchestrator = await harness.start_orchestrator()
        failed: set[str] = set()

        async def fails_once(ctx: TaskContext) -> dict[str, Any]:
            if ctx.payload.get("fail_once") and ctx.task_id not in failed:
                failed.add(ctx.task_id)
                raise RuntimeError("first attempt fails")
            return {"ok": True}

        await harness.start_agent("deploy-agent", ["deploy_check"], handler=fails_once)
        anyone = await orchestrator.submit_task(
            name="anyone", description="", task_type="job", payload={}, max_retries=0
        )
        retried = await orchestrator.submit_task(
            name="retried",
            description="",
            task_type="job",
            payload={"fail_once": True},
            required_capabilities=["deploy_check"],
            max_retries=2,
        )
        first, second = [
            await orchestrator.wait_for_task(task_id, timeout=60) for task_id in (anyone, retried)
        ]
        assert first["status"] == "completed"  # through the pre-declared @any queue
        assert second["status"] == "completed" and second["retry_count"] == 1
        stats = await orchestrator.get_stats()
        assert stats["tasks_completed"] == 2

        # The queues still have the arguments they were loaded with
        status, info = await asyncio.to_thread(
            api.call, "GET", f"/api/queues/%2F/{q(Topology(prefix).retry_queue(100))}"
        )
        assert info["arguments"] == Topology(prefix).retry_queue_arguments(100)
    finally:
        await harness.close()  # RabbitMQBus.delete_topology: fixed names, tiers, task queues
    for queue in document["queues"]:
        status, _ = await asyncio.to_thread(api.call, "GET", f"/api/queues/%2F/{q(queue['name'])}")
        assert status == 404, f"{queue['name']} was left behind"


def dynamic(prefix: str, queue: str, fixed_queues: set[str]) -> bool:
    """A queue declared at run time, by design not in the definitions: a task
    queue other than @any (declared at first use), an agent's control queue, a
    registered agent's events queue, a monitor's queue, a reply queue, the
    leading orchestrator's lease (exclusive to its connection)."""
    if queue in fixed_queues:
        return False
    if queue == getattr(Topology(prefix), "leader_queue", None):
        return True
    return (
        queue.startswith(
            (
                f"{prefix}.tasks.",
                f"{prefix}.agent.",
                f"{prefix}.monitor.",
                f"{prefix}.orchestrator.events.",
            )
        )
        or queue.startswith("amq.")
        or not queue.startswith(f"{prefix}.")
    )


@pytest.mark.rabbitmq
async def test_orchestrator_serve_declares_nothing_the_definitions_lack(prefix: str) -> None:
    # Given the deployment's definitions for this test's prefix, loaded through the API
    api = management_api()
    document = generate.definitions(prefix)
    del document["vhosts"]
    status, body = await asyncio.to_thread(api.call, "POST", "/api/definitions", document)
    assert status in (200, 201, 204), body
    deployment = Deployment(prefix, BROKER_URL)
    try:
        # When `orchestrator serve` and an agent run there, a task completes, another
        # goes through a retry tier, and a user asks for statistics and watches
        await deployment.serve()
        await deployment.agent("deploy_agent", "deploy_check")
        done = await deployment.run("submit", "job", "-r", "deploy_check", "--wait")
        assert done.code == 0, done
        retried = await deployment.run(
            "submit", "late", "-r", "deploy_check", "-p", '{"sleep": 3}',
            "--timeout", "0.3", "--max-retries", "1", "--wait", "--json",
        )  # fmt: skip
        assert retried.code == 4, retried
        assert json.loads(retried.out)["retry_count"] == 1
        anyone = await deployment.run("submit", "job", "--wait")  # through job.@any
        assert anyone.code == 0, anyone
        stats = await deployment.run("stats", "--json")
        assert stats.code == 0, stats
        assert json.loads(stats.out)["tasks_created"] == 3
        watched = await deployment.run("watch", "--seconds", "1")
        assert watched.code == 0, watched

        # Then the broker's durable names of the prefix are exactly the definitions'
        _, queues = await asyncio.to_thread(
            api.call, "GET", "/api/queues/%2F?columns=name,durable,auto_delete,arguments"
        )
        _, exchanges = await asyncio.to_thread(api.call, "GET", "/api/exchanges/%2F")
        _, bindings = await asyncio.to_thread(api.call, "GET", "/api/bindings/%2F")
    finally:
        await deployment.close()

    def queue_entry(q: dict[str, Any]) -> tuple[Any, ...]:
        return (
            q["name"],
            q["durable"],
            q["auto_delete"],
            json.dumps(q["arguments"], sort_keys=True),
        )

    fixed_queues = {q["name"] for q in document["queues"]}
    on_broker = {
        queue_entry(q)
        for q in queues
        if q["name"].startswith(f"{prefix}.") and not dynamic(prefix, q["name"], fixed_queues)
    }
    assert on_broker == {queue_entry(q) for q in document["queues"]}
    seen = {q["name"] for q in queues if q["name"].startswith(f"{prefix}.")}
    assert f"{prefix}.tasks.job.deploy_check" in seen  # the dynamic ones were there, excluded
    assert any(name.startswith(f"{prefix}.agent.") for name in seen)
    assert {(e["name"], e["type"], e["durable"], e["auto_delete"]) for e in exchanges
            if e["name"].startswith(f"{prefix}.")} == {
        (e["name"], e["type"], e["durable"], e["auto_delete"]) for e in document["exchanges"]
    }  # fmt: skip
    assert {
        (b["source"], b["destination"], b["routing_key"])
        for b in bindings
        if b["source"].startswith(f"{prefix}.")
        and not dynamic(prefix, b["destination"], fixed_queues)
    } == {(b["source"], b["destination"], b["routing_key"]) for b in document["bindings"]}
    # And the deployment's clean-up removed them all
    for queue in document["queues"]:
        status, _ = await asyncio.to_thread(api.call, "GET", f"/api/queues/%2F/{q(queue['name'])}")
        assert status == 404, f"{queue['name']} was left behind"


@pytest.mark.rabbitmq
async def test_users_file_and_definitions_make_a_vhost_the_deployment_can_log_into(
    tmp_path: Path, prefix: str
) -> None:
    # Given what the compose file's init service writes, for a vhost and users of
    # this test's own (as a fresh broker would import them at boot)
    api = management_api()
    token = uuid.uuid4().hex[:10]
    vhost, operator, user_prefix = f"test-{token}", f"test-{token}-ops", f"test-{token}-"
    passwords = {name: secrets.token_urlsafe(16) for name in generate.role_users()}
    password = secrets.token_urlsafe(16)
    source = tmp_path / "definitions.json"
    source.write_text(json.dumps(generate.definitions(prefix, vhost=vhost)))
    written = generate.install(
        source, tmp_path / "definitions.d", operator, password, passwords, prefix, user_prefix
    )
    users = generate.role_users(prefix, user_prefix)
    parts = urlsplit(BROKER_URL)
    address = f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}"

    def url(user: str, secret: str) -> str:
        return f"amqp://{user}:{secret}@{address}/{quote(vhost, safe='')}"

    def bus(user: str, secret: str) -> RabbitMQBus:
        settings = BusSettings(broker_url=url(user, secret), prefix=prefix, connect_attempts=1)
        return RabbitMQBus(settings=settings)

    try:
        for path in sorted(written):
            status, body = await asyncio.to_thread(
                api.call, "POST", "/api/definitions", json.loads(path.read_text())
            )
            assert status in (200, 201, 204), (path.name, body)
        status, info = await asyncio.to_thread(api.call, "GET", f"/api/users/{q(operator)}")
        assert status == 200 and "administrator" in str(info["tags"])
        for role in users.values():
            status, info = await asyncio.to_thread(api.call, "GET", f"/api/users/{q(role.user)}")
            assert status == 200 and not info["tags"], role.user

        # Then the orchestrator's user logs in with its password (the hash is
        # RabbitMQ's) and declares the topology as the bus declares it
        orchestrator = bus(users["orchestrator"].user, passwords["orchestrator"])
        await orchestrator.connect()
        try:
            assert orchestrator.declares == "all"
            await orchestrator.declare(orchestrator.topology.everything())
            assert await orchestrator.queue_depth(ANY_CAPABILITY_KEY) == 0
        finally:
            await orchestrator.close()
        # And an agent's user logs in and finds it, declaring nothing shared
        analyst = bus(users["analyst"].user, passwords["analyst"])
        await analyst.connect()
        try:
            assert analyst.declares == "own"
        finally:
            await analyst.close()
        # But not with another password
        wrong = bus(users["orchestrator"].user, "wrong")
        with pytest.raises(BusConnectionError):
            await wrong.connect()
        await wrong.close()
    finally:
        await asyncio.to_thread(api.call, "DELETE", f"/api/vhosts/{q(vhost)}")
        for user in [operator, *(r.user for r in users.values())]:
            await asyncio.to_thread(api.call, "DELETE", f"/api/users/{q(user)}")
