"""This gateway's identity: one row, made by the first migration run on a database.

Every identifier PacsLens mints (SR UIDs, HL7 control ids, FHIR identifiers) derives from it
and from a random UUID per result, so two installations, a reinstall on a fresh database or a
staging copy never mint the same identifier. It lives in the database, so a restored backup
keeps it and a fresh install gets a new one; `DATA_DIR/installation.json` mirrors it so the
files of a data dir say which gateway wrote them (results/deliver/identity.py keeps the two in step).
"""

from __future__ import annotations

import base64
import uuid

from django.db import models
from django.utils import timezone


class Installation(models.Model):
    uuid = models.UUIDField(unique=True, default=uuid.uuid4, editable=False)
    # Always True: the unique constraint on it allows one row only.
    singleton = models.BooleanField(default=True, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    def __str__(self) -> str:
        return f"PacsLens installation {self.uuid}"

    @property
    def tag(self) -> str:
        """Five characters that name this installation in HL7 control ids (25 bits of its UUID)."""
        return base32(self.uuid.bytes)[:5]


def base32(data: bytes) -> str:
    """RFC 4648 base32 without padding: A-Z and 2-7, safe in any HL7 field."""
    return base64.b32encode(data).decode("ascii").rstrip("=")
