"""The gateway's own certificate authority, for the web UI and the MQTT TLS listener.

A site LAN has no public DNS name and often no internet, so no public CA can issue a
certificate for it. The gateway makes its own CA on first start; installers import
``ca.pem`` once on their phones/laptops and nodes pin it. Keys are written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

# cryptography (~8 MB of RSS) is imported only to make the CA or a certificate, i.e. the
# first time TLS is switched on: app.py composes a GatewayCA whether or not TLS is on
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

CA_DAYS = 3650
SERVER_DAYS = 825


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class GatewayCA:
    def __init__(self, directory: Path, gateway_id: str) -> None:
        self.dir = directory
        self.gateway_id = gateway_id
        self.ca_cert = directory / "ca.pem"
        self.ca_key = directory / "ca.key"
        self.server_cert = directory / "server.pem"
        self.server_key = directory / "server.key"

    def ensure(self, extra_names: list[str] | None = None) -> None:
        if not (self.ca_cert.exists() and self.ca_key.exists()):
            self._make_ca()
        if not (self.server_cert.exists() and self.server_key.exists()):
            self._make_server(extra_names or [])

    def _make_ca(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Siteward"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"Siteward CA {self.gateway_id}")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256())
        )
        _write_secret(self.ca_key, _key_pem(key))
        self.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _make_server(self, extra_names: list[str]) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        host = socket.gethostname()
        dns = sorted({host, f"{host}.local", "localhost", self.gateway_id, *extra_names})
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns if n]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        _write_secret(self.server_key, _key_pem(key))
        self.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.server_cert, self.server_key)
        return ctx
