"""DICOM TLS contexts (PS3.15 Annex B.9, BCP 195 profile): one for the listener, one for our SCUs.

Both require TLS 1.2 or later and forward-secret AEAD ciphers. The listener asks for a client
certificate and, unless PACSLENS_DICOM_TLS_REQUIRE_CLIENT_CERT=false, refuses a connection
without one signed by a CA in PACSLENS_DICOM_TLS_CA. Our SCUs verify the peer's certificate
against the same CA file (required: never the system's CAs, which vouch for any public host
name while the host name goes unchecked) and present our certificate, since
many PACS require one. The host name in the peer's certificate is not checked by default: DICOM
peers are configured by IP address more often than not, and their certificates name hosts;
PACSLENS_DICOM_TLS_CHECK_HOSTNAME=true turns the check on. See docs/tls.md.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

# TLS 1.2 suites of BCP 195 (RFC 9325 4.2): ECDHE/DHE key exchange, AES-GCM or ChaCha20-Poly1305.
# TLS 1.3 suites are all acceptable and are left at OpenSSL's defaults.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"

_cache: dict[tuple, ssl.SSLContext] = {}


def server_context() -> ssl.SSLContext:
    """The listener's context: our certificate, client certificates checked against the CA file."""
    cert = _required("PACSLENS_DICOM_TLS_CERT", settings.DICOM_TLS_CERT)
    key = _required("PACSLENS_DICOM_TLS_KEY", settings.DICOM_TLS_KEY)
    ca = settings.DICOM_TLS_CA
    require = settings.DICOM_TLS_REQUIRE_CLIENT_CERT
    if require:
        ca = _required("PACSLENS_DICOM_TLS_CA", ca)
    key_ = ("server", _stamp(cert), _stamp(key), _stamp(ca), require)
    if key_ not in _cache:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _harden(context)
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
        if ca:
            context.load_verify_locations(cafile=str(ca))
            context.verify_mode = ssl.CERT_REQUIRED if require else ssl.CERT_OPTIONAL
        _cache[key_] = context
    return _cache[key_]


def client_context() -> ssl.SSLContext:
    """Our SCUs' context: the peer verified against the CA file; our certificate offered if configured."""
    cert, key, ca = settings.DICOM_TLS_CERT, settings.DICOM_TLS_KEY, settings.DICOM_TLS_CA
    check_hostname = settings.DICOM_TLS_CHECK_HOSTNAME
    key_ = ("client", _stamp(cert), _stamp(key), _stamp(ca), check_hostname)
    if key_ not in _cache:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _harden(context)
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = check_hostname
        # No CA file: nothing is trusted, every handshake fails (and outbound_tls_check in
        # routing/models/core.py keeps the listener and workers from starting).
        if ca:
            context.load_verify_locations(cafile=str(ca))
        if cert and key:
            context.load_cert_chain(certfile=str(cert), keyfile=str(key))
        _cache[key_] = context
    return _cache[key_]


def client_tls_args(*, tls: bool, host: str) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's `tls_args` for an association to `host`: None for a plain connection."""
    return (client_context(), host) if tls else None


def handshake_problem(tls_args: tuple[ssl.SSLContext, str], host: str, port: int, timeout: float) -> str | None:
    """Why a TLS handshake with host:port fails (OpenSSL's reason), None if it succeeds or TCP fails.

    pynetdicom logs a failed handshake and reports only "cannot connect"; this second attempt,
    made only after a failure, tells the user it is a certificate matter and which one.
    """
    context, server_hostname = tls_args
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=server_hostname),
        ):
            return None
    except ssl.SSLError as exc:
        return exc.reason or type(exc).__name__
    except ssl.CertificateError as exc:  # host name mismatch (PACSLENS_DICOM_TLS_CHECK_HOSTNAME)
        return str(exc)
    except OSError:
        return None


def certificate_names(certificate: dict | None) -> set[str]:
    """The names a verified peer certificate (`SSLSocket.getpeercert()`) carries: subject CN and DNS subjectAltNames."""
    if not certificate:
        return set()
    names = {value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"}
    names.update(value for kind, value in certificate.get("subjectAltName", ()) if kind == "DNS")
    return names


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def _required(name: str, path: Path | None) -> Path:
    if path is None:
        raise ImproperlyConfigured(f"DICOM TLS needs {name}")
    if not Path(path).is_file():
        raise ImproperlyConfigured(f"{name}={str(path)!r} is not a readable file")
    return Path(path)


def _stamp(path: Path | None) -> tuple | None:
    """Path and modification time: our SCUs pick up a renewed certificate without a restart."""
    if path is None:
        return None
    try:
        return (str(path), Path(path).stat().st_mtime_ns)
    except OSError:
        return (str(path), None)
