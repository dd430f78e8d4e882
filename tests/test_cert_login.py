"""The user of a login by client certificate (``auth=external``, issue 11): the
bus names it as the broker does, from the certificate's subject, or as
``broker_user`` says; certificates made as tests/test_tls.py makes them."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest

from broker import BusSettings, RabbitMQBus
from broker.cert_login import certificate_user
from deploy.tls.make_certs import CertificateAuthority


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path, "test-ca")


def external(ca: CertificateAuthority, name: str, **settings: object) -> BusSettings:
    issued = ca.issue(name, server=False, organization="Example Org")
    return BusSettings(
        broker_url="amqps://rabbit:5671/?auth=external",
        broker_ca_file=str(ca.path),
        broker_cert_file=str(issued.cert),
        broker_key_file=str(issued.key),
        **settings,
    )


def test_the_user_is_the_certificate_s_common_name_by_default(ca: CertificateAuthority) -> None:
    # Given a client certificate of subject O=Example Org, CN=agent-1 and a login by it
    settings = external(ca, "agent-1")

    # Then the bus publishes as its common name, as RabbitMQ's ssl_cert_login_from = common_name
    assert RabbitMQBus(settings=settings).user == "agent-1"
    assert RabbitMQBus(settings=settings).orchestrator_user == "agent-1"


def test_the_distinguished_name_is_written_as_rabbitmq_writes_it(
    ca: CertificateAuthority,
) -> None:
    settings = external(ca, "agent-1", broker_cert_login_from="distinguished_name")
    assert RabbitMQBus(settings=settings).user == "CN=agent-1,O=Example Org"


def test_broker_user_wins_over_the_certificate(
    ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the user in the environment, as a deployment gives it
    monkeypatch.setenv("ORCHESTRATOR_BROKER_USER", "the-orchestrator")
    settings = external(ca, "agent-1")
    assert RabbitMQBus(settings=settings).user == "the-orchestrator"


def test_a_password_login_s_user_stays_the_url_s() -> None:
    assert RabbitMQBus(settings=BusSettings(broker_url="amqp://alice@rabbit/")).user == "alice"
    with pytest.raises(
        ValueError, match=r"(?s)broker_user.*only for a login by client certificate"
    ):
        BusSettings(broker_url="amqp://alice@rabbit/", broker_user="bob")
    with pytest.raises(ValueError, match="broker_cert_login_from"):
        BusSettings(broker_url="amqp://alice@rabbit/", broker_cert_login_from="serial")


def test_what_cannot_name_the_user_is_refused_before_connecting(
    ca: CertificateAuthority, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A login by certificate without a certificate
    with pytest.raises(ValueError, match=r"^broker_cert_file: auth=external logs in by client"):
        RabbitMQBus(settings=BusSettings(broker_url="amqps://rabbit/?auth=external"))
    # A file that holds no certificate
    not_a_cert = tmp_path / "key-only.pem"
    not_a_cert.write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="holds no certificate"):
        certificate_user(str(not_a_cert), "common_name")
    # Without cryptography: the error names the extra and broker_user
    real_import = builtins.__import__

    def no_cryptography(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("cryptography"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    settings = external(ca, "agent-2")  # a file not read before
    monkeypatch.setattr(builtins, "__import__", no_cryptography)
    with pytest.raises(
        ValueError, match=r"needs the cryptography package.*external-auth.*broker_user"
    ):
        RabbitMQBus(settings=settings)
    # and broker_user needs no certificate reading at all
    assert RabbitMQBus(settings=settings.model_copy(update={"broker_user": "x"})).user == "x"


def test_a_renewed_certificate_is_read_again(ca: CertificateAuthority) -> None:
    # Given a bus whose certificate file is replaced by one of another name
    settings = external(ca, "before")
    bus = RabbitMQBus(settings=settings)
    assert bus.user == "before"
    renewed = ca.issue("after", server=False)
    Path(settings.broker_cert_file or "").write_bytes(renewed.cert.read_bytes())

    # Then the name is read from the file as it is now
    assert bus.user == "after"
