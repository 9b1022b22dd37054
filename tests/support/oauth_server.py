"""An OAuth 2.0 authorization server and resource gateway for the tests, built on authlib's server
side: the token endpoint (client credentials, RFC 6749 §4.4) issues expiring bearer tokens, and
every other path is a protected resource that checks the token (RFC 6750) and forwards the
request to a real peer behind it (the Medplum FHIR server, Orthanc's DICOMweb).

    gateway = OAuthGateway(upstream=orthanc.dicomweb_url, tls=tls_pair, lifetime=3)
    gateway.register("pacslens", "s3cret")
    gateway.token_url      https://127.0.0.1:PORT/token
    gateway.url            https://127.0.0.1:PORT/api   (forwarded to the upstream)

Served over HTTPS with a certificate from a test CA (tests/support/certs.py), so the CA bundle
is exercised too. What it saw is counted: `token_requests`, `refused` (401s), `forwarded`; tests
change its state between requests: `revoke_client`, `forget_tokens` (a server restart).
"""

from __future__ import annotations

import http.server
import json
import secrets
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    ClientMixin,
    OAuth2Error,
    OAuth2Request,
    ResourceProtector,
    TokenMixin,
)
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc6750 import BearerTokenGenerator, BearerTokenValidator

from tests.support.certs import Pair, ca_make, leaf_make
from tests.support.net import free_port

# Headers a proxy must not copy from one hop to the next (RFC 9110 §7.6.1), plus our own.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host", "authorization", "content-length"}


@dataclass
class Client(ClientMixin):
    client_id: str
    client_secret: str = field(repr=False)
    revoked: bool = False

    def get_client_id(self) -> str:
        return self.client_id

    def get_allowed_scope(self, scope: str | None) -> str:
        return scope or ""

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(client_secret, self.client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "client_secret_basic"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"


@dataclass
class Token(TokenMixin):
    access_token: str
    client_id: str
    scope: str
    audience: str
    issued_at: float
    expires_in: int
    revoked: bool = False

    def check_client(self, client: ClientMixin) -> bool:
        return client.get_client_id() == self.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return self.revoked


class _Request(OAuth2Request):
    """What authlib's endpoints read of an HTTP request: method, URI, headers, form fields."""

    def __init__(self, method: str, uri: str, headers: Any, form: dict[str, str]) -> None:
        super().__init__(method, uri, headers=headers)
        self.payload = BasicOAuth2Payload(form)
        self._form = form

    @property
    def form(self) -> dict[str, str]:
        return self._form


class _TokenServer(AuthorizationServer):
    def __init__(self, gateway: OAuthGateway) -> None:
        super().__init__()
        self.gateway = gateway
        self.register_grant(ClientCredentialsGrant)
        self.register_token_generator(
            "default",
            BearerTokenGenerator(
                access_token_generator=lambda **_: secrets.token_urlsafe(24),
                expires_generator=lambda client, grant_type: gateway.lifetime,
            ),
        )

    def query_client(self, client_id: str) -> Client | None:
        client = self.gateway.clients.get(client_id)
        return None if client is None or client.revoked else client

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        self.gateway.tokens[token["access_token"]] = Token(
            access_token=token["access_token"],
            client_id=request.client.get_client_id(),
            scope=token.get("scope", ""),
            audience=request.form.get("audience", ""),
            issued_at=time.time(),
            expires_in=token["expires_in"],
        )

    def create_oauth2_request(self, request: _Request) -> _Request:
        return request

    def handle_response(self, status: int, body: Any, headers: list[tuple[str, str]]) -> tuple[int, Any, list]:
        return status, body, headers

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass


class _Validator(BearerTokenValidator):
    def __init__(self, gateway: OAuthGateway) -> None:
        super().__init__()
        self.gateway = gateway

    def authenticate_token(self, token_string: str) -> Token | None:
        return self.gateway.tokens.get(token_string)


class OAuthGateway:
    def __init__(
        self, *, upstream: str, tls: Pair, lifetime: int = 60, upstream_headers: dict[str, str] | None = None
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.upstream_headers = upstream_headers or {}
        self.lifetime = lifetime
        self.clients: dict[str, Client] = {}
        self.tokens: dict[str, Token] = {}
        self.token_requests: list[dict[str, str]] = []  # the form fields of each (no secret in them)
        self.refused = 0
        self.forwarded = 0
        self.authorization = _TokenServer(self)
        self.protector = ResourceProtector()
        self.protector.register_token_validator(_Validator(self))
        gateway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                gateway.handle(self)

            def do_POST(self) -> None:
                gateway.handle(self)

            def do_PUT(self) -> None:
                gateway.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert, tls.key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def token_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/token"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/api"

    def register(self, client_id: str, client_secret: str) -> None:
        self.clients[client_id] = Client(client_id, client_secret)

    def revoke_client(self, client_id: str) -> None:
        """The identity provider disables the client: no new token, and its tokens stop working."""
        self.clients[client_id].revoked = True
        for token in self.tokens.values():
            if token.client_id == client_id:
                token.revoked = True

    def forget_tokens(self) -> None:
        """As after a restart of an authorization server that kept its tokens in memory."""
        self.tokens.clear()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        path = urllib.parse.urlsplit(request.path).path
        if path == "/token" and request.command == "POST":
            form = dict(urllib.parse.parse_qsl(body.decode()))
            self.token_requests.append(form)
            oauth_request = _Request("POST", f"https://127.0.0.1:{self.port}/token", request.headers, form)
            status, answer, headers = self.authorization.create_token_response(oauth_request)
            return self.reply(request, status, json.dumps(answer).encode(), dict(headers), "application/json")
        try:
            self.protector.validate_request(scopes=None, request=request)
        except OAuth2Error as error:
            self.refused += 1
            status, answer, headers = error()
            return self.reply(request, status, json.dumps(answer).encode(), dict(headers), "application/json")
        if not request.path.startswith("/api"):
            return self.reply(request, 404, b"{}", {}, "application/json")
        self.forwarded += 1
        try:
            upstream = requests.request(
                request.command,
                self.upstream + request.path.removeprefix("/api"),
                data=body or None,
                headers={
                    **{k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS},
                    **self.upstream_headers,
                },
                timeout=60,
            )
        except requests.RequestException:
            return self.reply(request, 502, b"{}", {}, "application/json")
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS | {"content-encoding"}}
        self.reply(request, upstream.status_code, upstream.content, headers, None)

    @staticmethod
    def reply(
        request: http.server.BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        headers: dict[str, str],
        content_type: str | None,
    ) -> None:
        request.send_response(status)
        if content_type:
            headers = {**headers, "Content-Type": content_type}
        for name, value in headers.items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


@dataclass
class TestCA:
    """A hospital CA and the gateway's certificate it signs; `other` is a CA that signs nothing here."""

    ca: Pair
    server: Pair
    other: Pair

    @property
    def bundle(self) -> str:
        return self.ca.cert.read_text()


@pytest.fixture(scope="session")
def oauth_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    folder = tmp_path_factory.mktemp("oauth-ca")
    ca = ca_make(folder, "hospital-internal-ca")
    return TestCA(ca=ca, server=leaf_make(folder, "idp-and-gateway", ca), other=ca_make(folder, "other-ca"))


@pytest.fixture
def oauth_gateway_factory(oauth_ca: TestCA) -> Iterator[Any]:
    started: list[OAuthGateway] = []

    def start(**kwargs: Any) -> OAuthGateway:
        gateway = OAuthGateway(tls=oauth_ca.server, **kwargs)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()
