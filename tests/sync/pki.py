"""Certificates made in the test: a cloud CA, the broker's server certificate, the
gateway's client certificate (mTLS, as AWS IoT Core does it) and a rogue one signed by
a CA the broker does not trust."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, cn: str, *, server: bool
          ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def make_pki(directory: Path, *, client_cn: str = "gw-test") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _ca("Test cloud CA")
    s_key, s_cert = _leaf(ca_key, ca, "cloud-broker", server=True)
    c_key, c_cert = _leaf(ca_key, ca, client_cn, server=False)
    rogue_ca_key, rogue_ca = _ca("Somebody else's CA")
    r_key, r_cert = _leaf(rogue_ca_key, rogue_ca, client_cn, server=False)
    p = Pki(ca=directory / "ca.pem", server_cert=directory / "server.pem", server_key=directory / "server.key",
            client_cert=directory / "client.pem", client_key=directory / "client.key",
            rogue_cert=directory / "rogue.pem", rogue_key=directory / "rogue.key")
    p.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    p.server_cert.write_bytes(s_cert.public_bytes(serialization.Encoding.PEM))
    p.client_cert.write_bytes(c_cert.public_bytes(serialization.Encoding.PEM))
    p.rogue_cert.write_bytes(r_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(p.server_key, s_key)
    _write_key(p.client_key, c_key)
    _write_key(p.rogue_key, r_key)
    return p
