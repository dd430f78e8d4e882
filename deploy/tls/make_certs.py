"""Certificates for the broker's TLS listener: a CA of our own, the broker's
certificate, and a client certificate for every process that connects.

For trying TLS out and for tests (tests/test_tls.py uses this module); in
production use your organisation's CA. Needs the ``cryptography`` package
(``pip install cryptography``: the project's test extra has it).

    python deploy/tls/make_certs.py deploy/tls/certs [--host rabbitmq --host localhost]

writes ca.pem, server.pem and server-key.pem (for rabbitmq-tls.conf) and
client.pem and client-key.pem (ORCHESTRATOR_BROKER_CERT_FILE and _KEY_FILE).
The CA's key is not kept: nothing more can be signed with it.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("rabbitmq", "localhost", "127.0.0.1")
"""Names the broker's certificate carries: docker compose's host name, and this machine."""


@dataclass
class Issued:
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
           password: bytes | None = None) -> Issued:  # fmt: skip
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    key_path.chmod(0o600)
    return Issued(cert_path, key_path)


class CertificateAuthority:
    """A certificate authority of our own, written to ``folder`` as ``<name>.pem``
    (its key stays in memory unless ``save_key``)."""

    def __init__(self, folder: Path, name: str, *, days: int = 1) -> None:
        self.folder = folder
        self.days = days
        self.key = _key()
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.path = folder / f"{name}.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str,
        *,
        server: bool,
        hosts: tuple[str, ...] = (),
        password: bytes | None = None,
        organization: str | None = None,
    ) -> Issued:
        """A certificate of subject ``CN=name`` (``O=organization`` before it, where given),
        and its key: ``name.pem`` and ``name-key.pem`` in the folder."""
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
        if organization is not None:
            subject.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return _write(self.folder, name, builder.sign(self.key, hashes.SHA256()), key, password)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where to write the PEM files")
    parser.add_argument(
        "--host",
        action="append",
        help=f"a name or address of the broker (repeatable); default: {' '.join(DEFAULT_HOSTS)}",
    )
    parser.add_argument("--days", type=int, default=365, help="validity (default: 365)")
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority(args.folder, "ca", days=args.days)
    server = ca.issue("server", server=True, hosts=tuple(args.host or DEFAULT_HOSTS))
    client = ca.issue("client", server=False)
    for path in (server.key, client.key):
        path.chmod(0o644)  # the broker's container user and the processes must read them
    print(f"wrote {ca.path}, {server.cert}, {server.key}, {client.cert}, {client.key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
