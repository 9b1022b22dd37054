"""How we authenticate to an HTTPS peer we call: OAuth 2.0 client credentials and the CA bundle.

`HttpClientAuth` is the set of fields a DICOMweb or FHIR destination (results app) and a DICOMweb
poll source share; it lives here because routing never imports results. The client secret is
sealed like a destination's password (routing/models/sealed.py) and never exported.

`OAuthToken` is the token cache every worker shares: one row per client (token URL, client id,
secret, scope, audience), holding the access token (sealed too) and when to fetch a new one.
The client that fills it is routing/oauth.py.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Self

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import models

from routing.models.sealed import SealedSecretField, UnreadableSecret

# Private keys never belong in a trust bundle; refuse them rather than store them unsealed.
_PRIVATE_KEY_MARK = "PRIVATE KEY-----"


def validate_ca_bundle(value: str) -> None:
    """One or more PEM certificates, every block parseable; nothing else."""
    if not value.strip():
        return
    if _PRIVATE_KEY_MARK in value:
        raise ValidationError("this holds a private key: paste only the CA certificate(s), never a key")
    from cryptography import x509  # noqa: PLC0415 - only the forms validate bundles; the listener loads this model

    try:
        certificates = x509.load_pem_x509_certificates(value.encode())
    except ValueError:
        raise ValidationError(
            "not a PEM certificate bundle: paste the CA certificate(s), each from "
            "-----BEGIN CERTIFICATE----- to -----END CERTIFICATE-----"
        ) from None
    if value.count("-----BEGIN ") != len(certificates):
        raise ValidationError("only CERTIFICATE blocks may be in a CA bundle")


class HttpClientAuth(models.Model):
    """OAuth 2.0 client credentials (RFC 6749 §4.4) and a trust bundle for one HTTPS peer."""

    oauth_token_url = models.CharField(
        max_length=300,
        blank=True,
        verbose_name="OAuth token URL",
        help_text="OAuth 2.0 client credentials: the authorization server's token endpoint",
    )
    oauth_client_id = models.CharField(max_length=200, blank=True, verbose_name="OAuth client id")
    # Encrypted at rest, write-only in the UI, never exported; dropped when the token URL or
    # client id changes (TARGET_FIELDS) so it never goes to another authorization server.
    oauth_client_secret = SealedSecretField(blank=True, verbose_name="OAuth client secret")
    oauth_scope = models.CharField(
        max_length=300, blank=True, verbose_name="OAuth scope", help_text="Space-separated, as the server expects"
    )
    oauth_audience = models.CharField(
        max_length=300, blank=True, verbose_name="OAuth audience", help_text="Sent as 'audience' when set"
    )
    ca_bundle = models.TextField(
        blank=True,
        validators=[validate_ca_bundle],
        verbose_name="CA bundle",
        help_text="PEM certificate(s) of the CA that signs this server's (and its token URL's) HTTPS "
        "certificate; empty: the system's CAs",
    )

    class Meta:
        abstract = True

    # The configuration fields, in form and YAML order (the secret is write-only, import-only).
    HTTP_AUTH_FIELDS = (
        "oauth_token_url",
        "oauth_client_id",
        "oauth_client_secret",
        "oauth_scope",
        "oauth_audience",
        "ca_bundle",
    )
    # Where (and how) the stored secrets go: when any of these changes, the secrets must be given
    # again, or a Test or the next request would hand them to the new target. Models extend it.
    TARGET_FIELDS: tuple[str, ...] = ("oauth_token_url", "oauth_client_id")

    # What TARGET_FIELDS were when the row was loaded (None for a new, unsaved row).
    _loaded_target: tuple[Any, ...] | None = None

    @classmethod
    def from_db(cls, db: str | None, field_names: Collection[str], values: Collection[Any], **kwargs: Any) -> Self:
        instance = super().from_db(db, field_names, values, **kwargs)
        if not instance.get_deferred_fields():
            instance._loaded_target = instance._target()
        return instance

    def _target(self) -> tuple[Any, ...]:
        # The column's value (application_entity_id), so an unloaded relation is never fetched.
        return tuple(getattr(self, getattr(self._meta.get_field(f), "attname", f)) for f in self.TARGET_FIELDS)

    @property
    def target_changed(self) -> bool:
        """Whether where or how the secrets are sent differs from what was loaded from the database."""
        loaded = getattr(self, "_loaded_target", None)
        return loaded is not None and loaded != self._target()

    @property
    def oauth_secret_unreadable(self) -> bool:
        return isinstance(self.oauth_client_secret, UnreadableSecret)

    def oauth_problems(self, *, required: bool) -> dict[str, str]:
        """Field errors of the OAuth settings; `required`: this peer authenticates with OAuth."""
        if not required:
            return {}
        errors = {}
        try:
            URLValidator(schemes=["https", "http"])(self.oauth_token_url)
        except ValidationError:
            errors["oauth_token_url"] = "OAuth needs the token endpoint's URL, starting with https://."
        if not self.oauth_client_id:
            errors["oauth_client_id"] = "OAuth needs the client id the authorization server gave us."
        if not self.oauth_client_secret and not self.oauth_secret_unreadable:
            errors["oauth_client_secret"] = "OAuth needs the client secret."
        return errors


class OAuthToken(models.Model):
    """A cached access token, shared by every worker and web process (routing/oauth.py)."""

    # HMAC of token URL, client id, secret, scope and audience: a changed secret or scope is a
    # new client and never gets a token fetched for the old one.
    client_key = models.CharField(max_length=64, unique=True)
    token_host = models.CharField(max_length=255, help_text="The token endpoint's host, for people reading the table")
    access_token = SealedSecretField()
    fetched_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    # Shortly before expires_at: from then on the next request fetches a fresh token.
    refresh_after = models.DateTimeField()

    def __str__(self) -> str:
        return f"OAuth token from {self.token_host}, expires {self.expires_at:%Y-%m-%d %H:%M:%S}"
