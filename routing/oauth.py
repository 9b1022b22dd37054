"""Calling HTTPS peers with OAuth 2.0 client credentials (RFC 6749 §4.4) and a per-peer CA bundle.

Used by DICOMweb polling (routing.pull) and by FHIR and STOW-RS delivery (results.deliver); it
lives in routing because routing never imports results.

- `access_token(client)`: a token from the shared cache (`OAuthToken` rows), or a fresh one from
  the token endpoint. authlib's requests client speaks the token endpoint (client_secret_basic,
  the error responses of RFC 6749 §5.2), so we keep no token protocol code of our own. A token is
  used until shortly before it expires (`refresh_after`); several workers may then fetch one
  each at the same moment, which the client credentials grant allows.
- `OAuthBearer`: a requests auth that puts the token on every request and, when the peer
  answers 401 anyway (revoked, or the server restarted and forgot it), fetches a new token and
  sends the same request once more.
- `TokenError`: the token endpoint could not be reached or refused us. Its own class in the
  delivery ledger ("token_error") and in poll errors, because the fix (the identity provider's
  client registration) is somewhere else than the peer's.
- `ca_bundle_file(pem)`: requests verifies against a file; the bundle is written once under the
  data dir, named by its content's hash. `PeerSession(tls_verify(peer))` makes it stick.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import requests
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.requests_client import OAuth2Session
from django.conf import settings
from django.utils import timezone

from routing.models.oauth import HttpClientAuth, OAuthToken

TOKEN_TIMEOUT = (10.0, 30.0)  # connect, read
# RFC 6749 makes expires_in optional; without it, use a token this long (a 401 still refreshes it).
DEFAULT_LIFETIME = timedelta(minutes=5)
# Fetch a new token this long before the old one expires: a request in flight, clocks a little off.
REFRESH_MARGIN_MAX = timedelta(seconds=60)
CA_BUNDLE_DIR = "ca-bundles"


class TokenError(Exception):
    """The token endpoint was unreachable or refused the client. No secret in the message."""

    def __init__(self, message: str, *, code: int | str | None = None) -> None:
        super().__init__(message)
        # The HTTP status, or the OAuth error code (invalid_client ...) when the endpoint answered one.
        self.code = code


@dataclass(frozen=True)
class OAuthClient:
    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    scope: str = ""
    audience: str = ""
    verify: bool | str = True

    @classmethod
    def of(cls, peer: HttpClientAuth) -> OAuthClient:
        return cls(
            token_url=peer.oauth_token_url,
            client_id=peer.oauth_client_id,
            client_secret=peer.oauth_client_secret,
            scope=peer.oauth_scope,
            audience=peer.oauth_audience,
            verify=tls_verify(peer),
        )

    @property
    def token_host(self) -> str:
        return urlsplit(self.token_url).netloc[:255]

    @property
    def cache_key(self) -> str:
        # Keyed with the secret key: the table names no client secret, not even as a plain hash.
        parts = "\x00".join((self.token_url, self.client_id, self.client_secret, self.scope, self.audience))
        return hmac.new(settings.SECRET_KEY.encode(), parts.encode(), hashlib.sha256).hexdigest()


def access_token(client: OAuthClient, *, refresh: bool = False) -> str:
    """A valid access token for `client`: the cached one, or (when `refresh`, or none is fresh)
    a new one from the token endpoint, stored for every other process. Raises TokenError."""
    now = timezone.now()
    if not refresh:
        cached = OAuthToken.objects.filter(client_key=client.cache_key, refresh_after__gt=now).first()
        if cached is not None and cached.access_token:  # "" when the secrets key changed: fetch again
            return cached.access_token
    token, expires_at = _fetch(client)
    fetched = timezone.now()
    margin = min(REFRESH_MARGIN_MAX, (expires_at - fetched) / 10)
    OAuthToken.objects.update_or_create(
        client_key=client.cache_key,
        defaults={
            "token_host": client.token_host,
            "access_token": token,
            "fetched_at": fetched,
            "expires_at": expires_at,
            "refresh_after": expires_at - margin,
        },
    )
    return token


def token_forget(client: OAuthClient) -> None:
    """Drop the cached token (its client was changed or removed)."""
    OAuthToken.objects.filter(client_key=client.cache_key).delete()


class OAuthBearer(requests.auth.AuthBase):
    """Bearer token from `access_token`; on a 401, one new token and one retry of the request.

    One per session (one delivery, one poll): the token is read from the cache once and reused
    for the session's requests; a 401 replaces it."""

    def __init__(self, client: OAuthClient) -> None:
        self.client = client
        self.token = ""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        self.token = self.token or access_token(self.client)
        request.headers["Authorization"] = f"Bearer {self.token}"
        request.register_hook("response", self._retry_on_401)
        return request

    def _retry_on_401(self, response: requests.Response, **kwargs) -> requests.Response:
        if response.status_code != 401:
            return response
        # As requests' own HTTPDigestAuth re-sends: the same prepared request, new credentials,
        # straight to the connection (so no hook runs again: one retry, never a loop).
        self.token = access_token(self.client, refresh=True)
        response.content  # noqa: B018 -- read the body so the connection can be reused
        response.close()
        retry = response.request.copy()
        retry.headers["Authorization"] = f"Bearer {self.token}"
        assert response.connection is not None  # set by the adapter that sent the first request
        again = response.connection.send(retry, **kwargs)
        again.history.append(response)
        again.request = retry
        return again


class PeerSession(requests.Session):
    """A session whose `verify` (the peer's CA bundle) wins over REQUESTS_CA_BUNDLE and
    CURL_CA_BUNDLE, which requests otherwise lets override it (psf/requests#3829); proxies and
    other environment settings still apply."""

    def __init__(self, verify: bool | str = True) -> None:
        super().__init__()
        self.verify = verify

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None and self.verify is not True:
            merged["verify"] = self.verify
        return merged


def tls_verify(peer: HttpClientAuth) -> bool | str:
    """What requests' `verify` should be for this peer: its CA bundle's file, or the system CAs."""
    return ca_bundle_file(peer.ca_bundle) if peer.ca_bundle.strip() else True


def ca_bundle_file(pem: str) -> str:
    """The bundle as a file under the data dir (written once; its name is its content's hash)."""
    data = pem.strip().encode() + b"\n"
    path = Path(settings.DATA_DIR) / CA_BUNDLE_DIR / f"{hashlib.sha256(data).hexdigest()}.pem"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_bytes(data)
        os.replace(temporary, path)
    return str(path)


def _fetch(client: OAuthClient) -> tuple[str, datetime]:
    where = f"token endpoint {client.token_host}"
    extra = {"audience": client.audience} if client.audience else {}
    with OAuth2Session(client.client_id, client.client_secret, scope=client.scope or None) as session:
        try:
            token = session.fetch_token(
                client.token_url,
                grant_type="client_credentials",
                timeout=TOKEN_TIMEOUT,
                verify=client.verify,  # per request: a session's own is overridden by REQUESTS_CA_BUNDLE
                **extra,
            )
        except AuthlibBaseError as exc:
            # invalid_client (revoked, wrong secret), invalid_scope, unauthorized_client ...
            error = str(exc.error)[:40]
            raise TokenError(f"{where} refused the client: {error}", code=error) from None
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            raise TokenError(f"{where} answered HTTP {status}", code=status) from None
        except requests.exceptions.SSLError:
            raise TokenError(f"{where}: TLS certificate not trusted (check the CA bundle)") from None
        except requests.RequestException as exc:
            raise TokenError(f"cannot reach {where}: {type(exc).__name__}") from None
    access = token.get("access_token")
    if not isinstance(access, str) or not access:
        raise TokenError(f"{where} answered without an access_token")
    expires_at = token.get("expires_at")
    if isinstance(expires_at, int):
        return access, datetime.fromtimestamp(expires_at, tz=UTC)
    return access, timezone.now() + DEFAULT_LIFETIME
