"""TLS to the broker: a CA, a server and a client certificate of the test's own,
a private node with a TLS listener that asks for the client's certificate, and
the orchestrator, an agent and ``submit --wait`` on it over amqps:// (issue 11).

The node boots once for the module (seconds). Its TLS listener has
``verify_peer`` and ``fail_if_no_peer_cert``: a client without a certificate
signed by the test's CA is refused. The processes get their TLS settings and
the password from ``ORCHESTRATOR_BROKER_*`` (the password in a file), as a
deployment gives them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from broker import AgentAnnounced, BusSettings, Event, RabbitMQBus, current_sender
from broker.rabbitmq_link import BrokerRefused
from deploy.tls.make_certs import CertificateAuthority, Issued
from tests import brokers
from tests.brokers import NodeConfig
from tests.deployment import ROOT, Deployment
from tests.harness import wait_until

TLS_DEPLOY = ROOT / "deploy" / "tls"


def shipped_conf() -> dict[str, str]:
    """deploy/tls/rabbitmq-tls.conf as keys and values."""
    lines = (TLS_DEPLOY / "rabbitmq-tls.conf").read_text().splitlines()
    pairs = [line.partition("=") for line in lines if line.strip() and not line.startswith("#")]
    return {key.strip(): value.strip() for key, _, value in pairs}


def shipped_listener(ca: CertificateAuthority, server: Issued, port: int) -> dict[str, str]:
    """The listener deploy/ ships, with this test's files and port."""
    ours = {
        "listeners.ssl.default": f"127.0.0.1:{port}",
        "/etc/rabbitmq/tls/ca.pem": str(ca.path),
        "/etc/rabbitmq/tls/server.pem": str(server.cert),
        "/etc/rabbitmq/tls/server-key.pem": str(server.key),
    }
    return {key: ours.get(key, ours.get(value, value)) for key, value in shipped_conf().items()}


pytestmark = pytest.mark.rabbitmq


@dataclass
class TlsBroker:
    node: brokers.RabbitMQNode
    port: int
    other_port: int
    """A TLS listener on 127.0.0.2, which the server certificate does not name."""
    ca: CertificateAuthority
    other_ca: CertificateAuthority
    client: Issued
    encrypted_client: Issued
    password_file: Path

    def url(self, host: str = "127.0.0.1") -> str:
        """The amqps:// URL, without the password (it is in ``password_file``)."""
        return f"amqps://guest@{host}:{self.port}/"

    def settings(self, **overrides: object) -> BusSettings:
        values: dict[str, object] = {
            "broker_url": self.url(),
            "broker_password_file": str(self.password_file),
            "broker_ca_file": str(self.ca.path),
            "broker_cert_file": str(self.client.cert),
            "broker_key_file": str(self.client.key),
            "connect_attempts": 1,
            **overrides,
        }
        return BusSettings(**values)

    def env(self) -> dict[str, str]:
        return {
            "ORCHESTRATOR_BROKER_PASSWORD_FILE": str(self.password_file),
            "ORCHESTRATOR_BROKER_CA_FILE": str(self.ca.path),
            "ORCHESTRATOR_BROKER_CERT_FILE": str(self.client.cert),
            "ORCHESTRATOR_BROKER_KEY_FILE": str(self.client.key),
        }


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    folder = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority(folder, "test-ca")
    other_ca = CertificateAuthority(folder, "other-ca")  # signed nothing of the broker's
    server = ca.issue("rabbit", server=True, hosts=("127.0.0.1", "localhost"))
    client = ca.issue("client", server=False)
    encrypted = ca.issue("client-encrypted", server=False, password=b"key-s3cret")
    password_file = folder / "broker-password"
    password_file.write_text("guest\n")
    port, other_port = brokers.free_port(), brokers.free_port()
    conf = shipped_listener(ca, server, port)
    config = NodeConfig(conf={**conf, "listeners.ssl.other": f"127.0.0.2:{other_port}"})
    try:
        node = brokers.new_node(config, label="tls")
    except brokers.Unavailable as exc:
        brokers.skip_or_fail(f"no private RabbitMQ node with a TLS listener: {exc}")
        raise
    try:
        yield TlsBroker(node, port, other_port, ca, other_ca, client, encrypted, password_file)
    finally:
        node.stop()


# --- the library ----------------------------------------------------------------------------


async def test_a_bus_connects_over_tls_with_a_client_certificate(tls_broker: TlsBroker) -> None:
    # Given the CA, a client certificate and the password in a file
    bus = RabbitMQBus(settings=tls_broker.settings(prefix="tls-lib"), declare_topology=False)

    # When the bus connects over amqps, then it is connected
    await bus.connect()
    try:
        assert bus.is_connected
    finally:
        await bus.close()


async def test_a_certificate_from_another_ca_is_refused_naming_the_ca_setting(
    tls_broker: TlsBroker,
) -> None:
    bus = RabbitMQBus(
        settings=tls_broker.settings(broker_ca_file=str(tls_broker.other_ca.path)),
        declare_topology=False,
    )
    with pytest.raises(BrokerRefused) as refused:
        await bus.connect()
    assert refused.value.setting == "broker_ca_file"
    assert str(refused.value).startswith("broker_ca_file: TLS to RabbitMQ at amqps://"), refused
    assert "not signed by a CA we trust" in str(refused.value)


async def test_a_host_the_certificate_does_not_name_is_refused(tls_broker: TlsBroker) -> None:
    # Given a listener on 127.0.0.2 too, whose certificate names 127.0.0.1 and localhost only
    named = RabbitMQBus(
        settings=tls_broker.settings(broker_url=tls_broker.url("localhost")),
        declare_topology=False,
    )
    await named.connect()  # a name it does carry: connected
    await named.close()
    unnamed = RabbitMQBus(
        settings=tls_broker.settings(
            broker_url=f"amqps://guest@127.0.0.2:{tls_broker.other_port}/"
        ),
        declare_topology=False,
    )

    # When a bus connects to 127.0.0.2, then the server name check refuses it, naming the URL
    with pytest.raises(BrokerRefused) as refused:
        await unnamed.connect()
    assert refused.value.setting == "broker_url"
    assert "its certificate does not name the host we connect to" in str(refused.value)
    assert "127.0.0.2" in str(refused.value)


async def test_no_client_certificate_is_refused_by_the_broker(tls_broker: TlsBroker) -> None:
    bus = RabbitMQBus(
        settings=tls_broker.settings(broker_cert_file=None, broker_key_file=None),
        declare_topology=False,
    )
    # Then the error points at the setting: the broker's alert says it wants a certificate
    # (TLS 1.3 sends it after the handshake: a reset may reach the client first, and then
    # the error says what a reset over TLS may mean)
    with pytest.raises(ConnectionError) as refused:
        await bus.connect()
    text = str(refused.value)
    assert (
        isinstance(refused.value, BrokerRefused)
        and text.startswith("broker_cert_file: TLS to RabbitMQ at ")
        and text.endswith("it refused our client certificate: tlsv13 alert certificate required")
    ) or "does the broker require a client certificate, broker_cert_file?" in text, text


async def test_an_encrypted_key_opens_with_its_password_only(tls_broker: TlsBroker) -> None:
    files = {
        "broker_cert_file": str(tls_broker.encrypted_client.cert),
        "broker_key_file": str(tls_broker.encrypted_client.key),
    }
    without = RabbitMQBus(settings=tls_broker.settings(**files), declare_topology=False)
    with pytest.raises(ValueError, match=r"^broker_key_password: the key .* is encrypted"):
        await without.connect()
    wrong = RabbitMQBus(
        settings=tls_broker.settings(**files, broker_key_password="nope"), declare_topology=False
    )
    with pytest.raises(ValueError, match=r"^broker_key_password: it does not open the key"):
        await wrong.connect()
    right = RabbitMQBus(
        settings=tls_broker.settings(**files, broker_key_password="key-s3cret"),
        declare_topology=False,
    )
    await right.connect()
    await right.close()


async def test_verification_off_connects_and_warns_at_each_connect(
    tls_broker: TlsBroker, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tls_broker.settings(
        broker_ca_file=str(tls_broker.other_ca.path), broker_tls_verify=False
    )
    for _ in range(2):
        bus = RabbitMQBus(settings=settings, declare_topology=False)
        await bus.connect()
        await bus.close()
    warnings = [r for r in caplog.records if r.name == "broker.tls" and r.levelname == "WARNING"]
    assert len(warnings) == 2, caplog.text
    assert "verification is OFF" in warnings[0].getMessage()


def test_the_context_checks_what_it_was_given(tls_broker: TlsBroker) -> None:
    from broker.tls import client_context

    context = client_context(tls_broker.settings(), tls_broker.url())
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


# --- a login by client certificate (RabbitMQ's EXTERNAL mechanism) --------------------------

EXTERNAL_USER = "ext-agent"


@dataclass
class ExternalBroker:
    node: brokers.RabbitMQNode
    port: int
    ca: CertificateAuthority
    client: Issued
    """CN=ext-agent, O=Example Org: a user of that common name exists, without a password login."""

    def settings(self, **overrides: object) -> BusSettings:
        values: dict[str, object] = {
            "broker_url": f"amqps://127.0.0.1:{self.port}/?auth=external",
            "broker_ca_file": str(self.ca.path),
            "broker_cert_file": str(self.client.cert),
            "broker_key_file": str(self.client.key),
            "connect_attempts": 1,
            **overrides,
        }
        return BusSettings(**values)


@pytest.fixture(scope="module")
def external_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExternalBroker]:
    """A node whose TLS listener (the shipped one) also takes EXTERNAL logins, the user
    named by the certificate's common name (``ssl_cert_login_from = common_name``)."""
    folder = tmp_path_factory.mktemp("tls-external")
    ca = CertificateAuthority(folder, "test-ca")
    server = ca.issue("rabbit", server=True, hosts=("127.0.0.1", "localhost"))
    client = ca.issue(EXTERNAL_USER, server=False, organization="Example Org")
    port = brokers.free_port()
    conf = shipped_listener(ca, server, port)
    conf.update(
        {
            "auth_mechanisms.1": "PLAIN",
            "auth_mechanisms.2": "AMQPLAIN",
            "auth_mechanisms.3": "EXTERNAL",
            "ssl_cert_login_from": "common_name",
        }
    )
    config = NodeConfig(conf=conf, plugins=("rabbitmq_auth_mechanism_ssl",))
    try:
        node = brokers.new_node(config, label="tls-external")
    except brokers.Unavailable as exc:
        brokers.skip_or_fail(f"no private RabbitMQ node with EXTERNAL logins: {exc}")
        raise
    try:
        node.ctl("add_user", EXTERNAL_USER, secrets.token_hex(16))  # its password is never used
        node.ctl("set_permissions", "-p", "/", EXTERNAL_USER, ".*", ".*", ".*")
        yield ExternalBroker(node, port, ca, client)
    finally:
        node.stop()


async def test_a_certificate_login_publishes_as_the_certificate_s_user(
    external_broker: ExternalBroker, prefix: str
) -> None:
    # Given a bus that logs in by its certificate: no user name, no password
    bus = RabbitMQBus(settings=external_broker.settings(prefix=prefix))
    assert bus.user == EXTERNAL_USER  # read from the certificate, as the broker does
    heard: list[tuple[str, str | None]] = []
    await bus.connect()
    try:

        async def on_event(event: Event) -> None:
            sender = current_sender()
            heard.append((event.agent_id, sender.user if sender is not None else None))

        await bus.subscribe_events(on_event)

        # When it publishes (every message stamped with that user, which the broker checks)
        await bus.publish_event(
            AgentAnnounced(agent_id=EXTERNAL_USER, capabilities=[], max_concurrent_tasks=1)
        )

        # Then the broker took it, and it arrives as the certificate's user's
        async def arrived() -> bool:
            return bool(heard)

        await wait_until(arrived, timeout=20)
        assert heard == [(EXTERNAL_USER, EXTERNAL_USER)]
    finally:
        await bus.close()


async def test_a_certificate_of_a_user_the_broker_lacks_is_one_line_naming_it(
    external_broker: ExternalBroker, prefix: str
) -> None:
    # Given a certificate of the right CA for a user the broker does not have
    stranger = external_broker.ca.issue("stranger", server=False)
    settings = external_broker.settings(
        prefix=prefix, broker_cert_file=str(stranger.cert), broker_key_file=str(stranger.key)
    )

    # When a bus logs in with it, then the refusal names the certificate and its user
    with pytest.raises(BrokerRefused) as refused:
        await RabbitMQBus(settings=settings).connect()
    assert str(refused.value).startswith("broker_cert_file: RabbitMQ at "), refused.value
    assert "refused the certificate login of user 'stranger'" in str(refused.value)


async def test_a_certificate_login_as_another_user_is_refused_by_the_broker(
    external_broker: ExternalBroker, prefix: str
) -> None:
    # Given a bus told (wrongly) that the broker names it otherwise
    bus = RabbitMQBus(
        settings=external_broker.settings(
            prefix=prefix, broker_cert_login_from="distinguished_name"
        )
    )
    assert bus.user == f"CN={EXTERNAL_USER},O=Example Org"
    await bus.connect()
    try:
        # When it publishes, then the broker refuses the message's user_id
        with pytest.raises(Exception) as refused:
            await asyncio.wait_for(
                bus.publish_event(
                    AgentAnnounced(agent_id=EXTERNAL_USER, capabilities=[], max_concurrent_tasks=1)
                ),
                30,
            )
        assert "user_id" in str(refused.value) or "PRECONDITION" in str(refused.value), repr(
            refused.value
        )
    finally:
        await bus.close()


# --- the processes, as a deployment runs them -----------------------------------------------


@pytest.fixture
async def tls_deployment(tls_broker: TlsBroker, prefix: str) -> AsyncIterator[Deployment]:
    """Serve and agents of this test on the TLS listener, set up by ORCHESTRATOR_BROKER_*."""
    deployment = Deployment(prefix, tls_broker.url())
    deployment.env.update(tls_broker.env())
    deployment.client = RabbitMQBus(
        settings=tls_broker.settings(prefix=prefix), declare_topology=False
    )
    try:
        yield deployment
    finally:
        await deployment.close()


async def test_serve_an_agent_and_submit_wait_run_a_task_over_tls(
    tls_broker: TlsBroker, tls_deployment: Deployment
) -> None:
    # Given serve and an agent on amqps://, each with the CA, a client certificate and the
    # password file from the environment
    await tls_deployment.serve()
    await tls_deployment.agent("tls_agent", "analysis")

    # When a client submits a task with the TLS settings as options, and waits for it
    options = {
        "ORCHESTRATOR_BROKER_CA_FILE": "",
        "ORCHESTRATOR_BROKER_CERT_FILE": "",
        "ORCHESTRATOR_BROKER_KEY_FILE": "",
    }
    done = await tls_deployment.run(
        "submit", "analysis", "-r", "analysis", "-p", '{"over": "tls"}', "--wait", "--json",
        "--broker-ca-file", str(tls_broker.ca.path),
        "--broker-cert-file", str(tls_broker.client.cert),
        "--broker-key-file", str(tls_broker.client.key),
        **options,
    )  # fmt: skip

    # Then the task completed on the agent, with its result
    assert done.code == 0, done
    task = json.loads(done.out)
    assert task["status"] == "completed", task
    assert task["assigned_agent"] == "tls_agent"
    assert task["result"]["echo"] == {"over": "tls"}
    # And nothing warned: verification was on all along
    assert "WARNING" not in done.err + tls_deployment.log("serve"), done.err


async def test_a_command_with_the_wrong_ca_fails_in_one_line_naming_the_ca(
    tls_broker: TlsBroker, tls_deployment: Deployment
) -> None:
    # When a command trusts another CA than the one that signed the broker's certificate
    result = await tls_deployment.run(
        "stats", "--broker-ca-file", str(tls_broker.other_ca.path), timeout=30
    )

    # Then it says so in one line naming the option, exit 1 (a setting to fix, not an outage)
    assert result.code == 1, result
    assert result.error == (
        f"error: --broker-ca-file: TLS to RabbitMQ at {tls_broker.url()}: its certificate is"
        " not signed by a CA we trust: self-signed certificate in certificate chain"
        " (broker_ca_file names the CA that signed it)"
    )
    # And from the environment, it names the variable
    by_env = await tls_deployment.run(
        "stats", ORCHESTRATOR_BROKER_CA_FILE=str(tls_broker.other_ca.path), timeout=30
    )
    assert by_env.code == 1, by_env
    assert by_env.error.startswith("error: ORCHESTRATOR_BROKER_CA_FILE: TLS to RabbitMQ at ")


async def test_verification_turned_off_is_a_warning_each_time(
    tls_broker: TlsBroker, tls_deployment: Deployment
) -> None:
    # Given a running orchestrator
    await tls_deployment.serve()

    # When a command turns verification off (trusting the wrong CA: only that makes it work)
    for args, env in [
        (["--tls-no-verify"], {}),
        ([], {"ORCHESTRATOR_BROKER_TLS_VERIFY": "false"}),
    ]:
        result = await tls_deployment.run(
            "stats", "--json", *args,
            ORCHESTRATOR_BROKER_CA_FILE=str(tls_broker.other_ca.path), **env,
        )  # fmt: skip

        # Then it works, and says on stderr, as a WARNING, that verification is off
        assert result.code == 0, result
        assert json.loads(result.out)["tasks_created"] == 0
        warnings = [line for line in result.err.splitlines() if " WARNING " in line]
        assert len(warnings) == 1, result.err
        assert "WARNING broker.tls: TLS certificate verification is OFF" in warnings[0]
        setting = "broker_tls_verify"
        assert f"({setting}) for 127.0.0.1" in warnings[0], warnings


async def test_the_url_s_no_verify_ssl_is_warned_about_too(tls_broker: TlsBroker) -> None:
    # aiormq's own URL option, which used to turn verification off silently
    url = f"{tls_broker.url()}?no_verify_ssl=1"
    bus = RabbitMQBus(
        settings=tls_broker.settings(broker_url=url, broker_ca_file=str(tls_broker.other_ca.path)),
        declare_topology=False,
    )

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("broker.tls").addHandler(handler)
    try:
        await bus.connect()
        await bus.close()
    finally:
        logging.getLogger("broker.tls").removeHandler(handler)
    assert [r.levelname for r in records] == ["WARNING"]
    assert "(no_verify_ssl)" in records[0].getMessage()


# --- deploy/tls -------------------------------------------------------------------------------


def test_deploy_shows_the_tls_listener_and_points_every_process_at_it() -> None:
    # The listener asks for client certificates (the fixture above boots it)
    conf = shipped_conf()
    assert conf["listeners.ssl.default"] == "5671"
    assert conf["ssl_options.verify"] == "verify_peer"
    assert conf["ssl_options.fail_if_no_peer_cert"] == "true"
    # And the compose override gives every process of deploy/docker-compose.yml amqps://
    # and the TLS files, on services that exist there
    base = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())["services"]
    tls = yaml.safe_load((TLS_DEPLOY / "docker-compose.tls.yml").read_text())["services"]
    assert set(tls) <= set(base), set(tls) - set(base)
    processes = {name for name, s in base.items() if "ORCHESTRATOR_BROKER_URL" in str(s)}
    assert processes and processes <= set(tls), processes - set(tls)
    for name in processes:
        env = tls[name]["environment"]
        assert env["ORCHESTRATOR_BROKER_URL"].startswith("amqps://"), name
        assert env["ORCHESTRATOR_BROKER_URL"].endswith("@rabbitmq:5671/"), name
        assert env["ORCHESTRATOR_BROKER_CA_FILE"] == "/tls/ca.pem", name
        assert {"ORCHESTRATOR_BROKER_CERT_FILE", "ORCHESTRATOR_BROKER_KEY_FILE"} <= set(env)


def test_make_certs_writes_what_the_listener_and_the_processes_read(tmp_path: Path) -> None:
    from deploy.tls.make_certs import main

    assert main([str(tmp_path / "certs")]) == 0
    written = {p.name for p in (tmp_path / "certs").iterdir()}
    assert written == {"ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem"}
    context = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.pem"))
    context.load_cert_chain(
        tmp_path / "certs" / "client.pem", tmp_path / "certs" / "client-key.pem"
    )
