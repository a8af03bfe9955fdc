"""A test PKI made with ``cryptography``: a CA, a server certificate for
localhost/127.0.0.1, a client certificate from the CA and one from another
CA, written as PEM files (``make_pki``)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: Any,
    issuer: str,
    issuer_key: Any,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    usage: Any = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(d: str) -> dict[str, str]:
    """A CA, a server cert for localhost/127.0.0.1, a client cert from the
    CA and one from another CA; written as PEM files in ``d``."""
    files: dict[str, str] = {}

    def write(name: str, cert: x509.Certificate, key: Any = None) -> None:
        path = os.path.join(d, f"{name}.pem")
        with open(path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        files[name] = path
        if key is not None:
            kpath = os.path.join(d, f"{name}.key")
            with open(kpath, "wb") as f:
                f.write(
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
            files[f"{name}.key"] = kpath

    ca_key, other_key = _key(), _key()
    ca = _cert("txvmbot test CA", ca_key, "txvmbot test CA", ca_key, ca=True)
    other = _cert("another CA", other_key, "another CA", other_key, ca=True)
    write("ca", ca)
    write("other-ca", other)
    sk = _key()
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    write(
        "server",
        _cert(
            "localhost",
            sk,
            "txvmbot test CA",
            ca_key,
            sans=sans,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
        ),
        sk,
    )
    ck = _key()
    write(
        "client",
        _cert("ci-runner", ck, "txvmbot test CA", ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH),
        ck,
    )
    ok = _key()
    write(
        "intruder",
        _cert("intruder", ok, "another CA", other_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH),
        ok,
    )
    return files
