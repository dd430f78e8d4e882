"""The broker user of a login by client certificate (RabbitMQ's EXTERNAL mechanism).

With ``auth=external`` in the broker URL the client sends no user name: the
broker takes it from the client certificate, as its ``ssl_cert_login_from``
says (``distinguished_name``, RabbitMQ's default, or ``common_name``, the
usual choice; the ``rabbitmq_auth_mechanism_ssl`` plugin does the login).
The bus still has to know that name: it stamps it on every message as the
AMQP ``user_id`` (``Envelope.stamped``), which RabbitMQ refuses unless it is
the connection's user, and agents obey only the orchestrator's user. So the
bus reads it from the same certificate, the same way as the broker
(``broker_cert_login_from``, default ``common_name``), unless
``broker_user`` names it, which wins (a broker configured otherwise, or a
certificate this process cannot read).

Reading a certificate needs ``cryptography``, an optional dependency (the
``external-auth`` extra), imported only here and only for such a login;
without it, a clear error names both ways out.
"""

from __future__ import annotations

import functools
import os
from typing import Literal
from urllib.parse import parse_qs, urlsplit

LoginFrom = Literal["common_name", "distinguished_name"]
"""RabbitMQ's ``ssl_cert_login_from`` values that this bus can follow."""

INSTALL_HINT = "pip install 'rabbit-task-orchestrator[external-auth]'"


def external_login(url: str) -> bool:
    """Whether ``url`` (one node address) logs in by certificate: aiormq's ``auth=external``."""
    return parse_qs(urlsplit(url).query).get("auth", ["plain"])[-1].lower() == "external"


def certificate_user(cert_file: str, login_from: LoginFrom) -> str:
    """The user name RabbitMQ takes from the first certificate in ``cert_file``.

    ``common_name``: the subject's CN (several: joined with commas, as RabbitMQ does).
    ``distinguished_name``: the subject as RabbitMQ writes it, RFC 4514
    (``CN=agent-1,O=Example``: the certificate's last RDN first).
    ``ValueError`` saying why, for a file that is not a certificate, a subject
    without a CN, or ``cryptography`` missing.
    """
    try:
        stat = os.stat(cert_file)
    except OSError as exc:
        raise ValueError(f"{cert_file!r} cannot be read: {exc.strerror or exc}") from None
    return _read(cert_file, login_from, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read(cert_file: str, login_from: LoginFrom, _mtime_ns: int, _size: int) -> str:
    """Cached by the file's time and size: the bus asks at each publish's stamp."""
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise ValueError(
            "reading the user name from the client certificate needs the cryptography"
            f" package ({INSTALL_HINT}); or set broker_user (ORCHESTRATOR_BROKER_USER)"
            " to the name the broker takes from it"
        ) from None
    try:
        with open(cert_file, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ValueError(f"{cert_file!r} cannot be read: {exc.strerror or exc}") from None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        try:
            cert = x509.load_der_x509_certificate(data)
        except ValueError:
            raise ValueError(f"{cert_file!r} holds no certificate (PEM or DER)") from None
    subject = cert.subject
    if login_from == "distinguished_name":
        name = subject.rfc4514_string()
        if not name:
            raise ValueError(f"the certificate in {cert_file!r} has an empty subject")
        return name
    common_names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not common_names:
        raise ValueError(
            f"the certificate in {cert_file!r} has no common name (CN) in its subject"
            f" {subject.rfc4514_string()!r}: set broker_cert_login_from=distinguished_name"
            " or broker_user, as the broker's ssl_cert_login_from says"
        )
    # Several CNs: RabbitMQ joins them with commas (use distinguished_name to escape them)
    return ",".join(
        value if isinstance(value := cn.value, str) else value.decode() for cn in common_names
    )
