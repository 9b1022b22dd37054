"""Secrets we must send on (a destination's password or bearer token, an OAuth client secret, a cached
access token), encrypted at rest.

The database holds Fernet tokens; the key lives outside it: PACSLENS_SECRETS_KEY (one or more
Fernet keys, comma-separated, newest first: the newest encrypts, all decrypt, so a key can be
rotated) or else `$PACSLENS_DATA_DIR/secrets.key`, created 0600 on first use. A copy of the
database alone gives away no credential.

A secret the configured keys cannot decrypt (the key file lost, a key rotated out) reads as an
UnreadableSecret: empty, so it is never sent, and kept as it was when the row is saved again.
Callers report it as a configuration error (`Destination.secret_unreadable`).

`cryptography` is imported on first use, not with the models: the DICOM listener loads every model
and never seals or unseals (docs/operations.md, "Listener memory").
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import models

if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

KEY_FILE_NAME = "secrets.key"
SECRET_UNREADABLE = (
    "the stored password or token cannot be decrypted with the configured keys "
    "(PACSLENS_SECRETS_KEY, or secrets.key in the data dir): restore the key, or enter the secret again"
)


class UnreadableSecret(str):
    """A stored secret no configured key decrypts: reads as "", keeps its ciphertext for saving."""

    ciphertext: str

    def __new__(cls, ciphertext: str) -> UnreadableSecret:
        value = super().__new__(cls, "")
        value.ciphertext = ciphertext
        return value


def seal(plaintext: str) -> str:
    return _fernet(_key_source()).encrypt(plaintext.encode()).decode()


def unseal(ciphertext: str) -> str:
    """The plaintext, or an UnreadableSecret when no configured key decrypts it."""
    from cryptography.fernet import InvalidToken  # noqa: PLC0415 - on first use (module docstring)

    try:
        return _fernet(_key_source()).decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        return UnreadableSecret(ciphertext)


class SealedSecretField(models.TextField):
    """A text column holding `seal(value)`; the model attribute holds the plaintext."""

    def from_db_value(self, value, expression, connection):
        return unseal(value) if value else ""

    def get_prep_value(self, value):
        if isinstance(value, UnreadableSecret):
            return value.ciphertext
        value = super().get_prep_value(value)
        return seal(value) if value else ""


def _key_source() -> tuple[str, ...] | Path:
    keys = tuple(settings.SECRETS_KEYS)
    return keys or Path(settings.DATA_DIR) / KEY_FILE_NAME


@cache
def _fernet(source: tuple[str, ...] | Path) -> MultiFernet:
    from cryptography.fernet import Fernet, MultiFernet  # noqa: PLC0415 - on first use (module docstring)

    keys = source if isinstance(source, tuple) else (_key_file(source),)
    try:
        return MultiFernet([Fernet(key) for key in keys])
    except ValueError:
        raise ImproperlyConfigured(
            f"{'PACSLENS_SECRETS_KEY' if isinstance(source, tuple) else source} must hold Fernet keys "
            "(32 url-safe base64-encoded bytes each; make one with: python -c "
            "'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
        ) from None


def _key_file(path: Path) -> str:
    from cryptography.fernet import Fernet  # noqa: PLC0415 - on first use (module docstring)

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created private (never on disk readable by others, not even for a moment) and complete
        # under a temporary name, then linked into place: a second process reads a whole key.
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(Fernet.generate_key().decode() + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made it first; use theirs
        finally:
            temporary.unlink()
    return path.read_text().strip()
