"""TLS for the daemon's TCP listener and its clients.

The daemon listens on a unix socket (``unix:<data_dir>/txvmbot.sock:mode=600``)
by default. Over TCP it serves only TLS clients presenting a certificate
signed by the configured CA: the handshake fails for anyone else, so no
command of theirs is ever read. Plain ``tcp:`` listeners are refused.

Clients check the daemon's certificate against their CA and its name (DNS
name or IP address, with service-identity) against the host they dialled.

Files are PEM. A CA file may hold several certificates; a certificate file
may hold a chain (leaf first).
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from txvmbot.errors import ConfigError

__all__ = [
    "TLSFilesLike",
    "check_listen",
    "client_tls_options",
    "listen_endpoint",
    "server_tls_options",
    "tls_server_endpoint",
]


class TLSFilesLike(Protocol):
    """Paths of PEM files: ``ca``, ``cert`` and ``key`` (such as
    :class:`txvmbot.daemon.settings.TLSFiles`)."""

    @property
    def ca(self) -> str: ...

    @property
    def cert(self) -> str: ...

    @property
    def key(self) -> str: ...


def _read(path: str, where: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(where, f"cannot read {path}: {e.strerror or e}") from None


def _certificates(path: str, where: str) -> list[Any]:
    """The certificates in the PEM file ``path``, as pyOpenSSL X509s."""
    from cryptography import x509
    from OpenSSL.crypto import X509

    data = _read(path, where)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ConfigError(where, f"{path} holds no PEM certificate: {e}") from None
    return [X509.from_cryptography(c) for c in certs]


def _private_key(path: str, where: str) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from OpenSSL.crypto import PKey

    data = _read(path, where)
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(where, f"{path} holds no unencrypted PEM private key: {e}") from None
    return PKey.from_cryptography_key(key)  # type: ignore[arg-type]


def _spki(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    data: bytes = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return data


def server_tls_options(tls: TLSFilesLike, where: str = "daemon.tls") -> Any:
    """``CertificateOptions`` for the daemon: its certificate and key, and
    client certificates required and checked against the CA."""
    from twisted.internet.ssl import CertificateOptions

    chain = _certificates(tls.cert, f"{where}.cert")
    key = _private_key(tls.key, f"{where}.key")
    cas = _certificates(tls.ca, f"{where}.ca")
    leaf = chain[0]
    if _spki(leaf.to_cryptography().public_key()) != _spki(key.to_cryptography_key().public_key()):
        raise ConfigError(
            f"{where}.key", f"{tls.key} is not the key of the certificate in {tls.cert}"
        )
    return CertificateOptions(
        privateKey=key,
        certificate=leaf,
        extraCertChain=chain[1:],
        verify=True,
        caCerts=cas,
        requireCertificate=True,
    )


def client_tls_options(hostname: str, ca_path: str, cert_path: str, key_path: str) -> Any:
    """Client TLS options: the daemon's certificate must be signed by the CA
    in ``ca_path`` and name ``hostname`` (a DNS name or an IP address); we
    present the certificate in ``cert_path`` with the key in ``key_path``."""
    from twisted.internet.ssl import (
        Certificate,
        KeyPair,
        PrivateCertificate,
        optionsForClientTLS,
        trustRootFromCertificates,
    )

    cas = [Certificate(c) for c in _certificates(ca_path, "tls.ca")]
    chain = _certificates(cert_path, "tls.cert")
    key = _private_key(key_path, "tls.key")
    if _spki(chain[0].to_cryptography().public_key()) != _spki(
        key.to_cryptography_key().public_key()
    ):
        raise ConfigError("tls.key", f"{key_path} is not the key of the certificate in {cert_path}")
    mine = PrivateCertificate(chain[0])
    mine._setPrivateKey(KeyPair(key))
    return optionsForClientTLS(
        hostname, trustRoot=trustRootFromCertificates(cas), clientCertificate=mine
    )


_SPLIT = re.compile(r"(?<!\\):")


def _fields(description: str) -> tuple[str, list[str], dict[str, str]]:
    parts = [p.replace("\\:", ":") for p in _SPLIT.split(description)]
    kind, rest = parts[0].lower(), parts[1:]
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for p in rest:
        if "=" in p:
            k, v = p.split("=", 1)
            kwargs[k] = v
        else:
            args.append(p)
    return kind, args, kwargs


def check_listen(description: str, has_tls: bool, where: str = "daemon.listen") -> str:
    """The daemon's listen rules, kept in one place (txvmbot.daemon.settings):
    unix sockets owner-only, ssl only with TLS files, no plain TCP."""
    from txvmbot.daemon.settings import check_listen as rules

    return rules(description, has_tls, where)


def tls_server_endpoint(
    reactor: Any, description: str, tls: TLSFilesLike, where: str = "daemon.listen"
) -> Any:
    """A TLS server endpoint from ``ssl:PORT[:interface=ADDR][:backlog=N]``
    that serves only clients with a certificate signed by ``tls.ca``.

    Certificates come from ``tls``, not from the string: ``privateKey=`` and
    ``certKey=`` are refused so nobody sets up a listener that skips client
    certificates by accident.
    """
    from twisted.internet.endpoints import SSL4ServerEndpoint

    check_listen(description, True, where)
    kind, args, kwargs = _fields(description)
    if kind != "ssl":
        raise ConfigError(where, f"{description!r}: expected ssl:PORT[:interface=ADDR]")
    extra = set(kwargs) - {"port", "interface", "backlog"}
    if extra:
        raise ConfigError(
            where,
            f"{description!r}: {', '.join(sorted(extra))} not allowed here; "
            "certificates come from [daemon.tls] (ca, cert, key)",
        )
    port_text = kwargs.get("port", args[0] if args else "")
    if len(args) > 1 or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(where, f"{description!r}: expected ssl:PORT with PORT from 0 to 65535")
    backlog = kwargs.get("backlog", "50")
    if not backlog.isdigit():
        raise ConfigError(where, f"{description!r}: backlog must be a number")
    return SSL4ServerEndpoint(
        reactor,
        int(port_text),
        server_tls_options(tls),
        backlog=int(backlog),
        interface=kwargs.get("interface", ""),
    )


def listen_endpoint(
    reactor: Any, description: str, tls: TLSFilesLike | None, where: str = "daemon.listen"
) -> Any:
    """The server endpoint for a listen string: a unix socket as given, or
    TLS with client certificates (:func:`tls_server_endpoint`)."""
    from twisted.internet.endpoints import serverFromString

    description = check_listen(description, tls is not None, where)
    if description.split(":", 1)[0].lower() == "unix":
        return serverFromString(reactor, description)
    assert tls is not None
    return tls_server_endpoint(reactor, description, tls, where)
