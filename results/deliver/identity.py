"""The installation identity and the identifiers minted from it.

`installation_current()` is this gateway's identity: the database row (made by the migration,
so a restored backup keeps it and a fresh database gets a new one), mirrored into
`DATA_DIR/installation.json`. `result_identity(result)` is what every SR UID and FHIR
identifier of a result derives from; `hl7_control_id()` mints one MSH-10 per delivery. Keys are
minted once, when the Delivery row is written, and read from the row on every re-send.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import uuid
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction

from results.deliver.payload import ResultIdentity
from results.models import InferenceResult, Installation
from results.models.installation import base32

logger = logging.getLogger(__name__)

IDENTITY_FILE = "installation.json"
# HL7 v2.3-2.5.1 MSH-10 is an ST of at most 20 characters: 5 name the installation, 15 (75
# random bits) the delivery.
HL7_CONTROL_ID_LENGTH = 20

# (data dir, uuid) pairs this process has already checked the file for.
_mirrored: set[tuple[str, uuid.UUID]] = set()


def installation_current() -> Installation:
    """The installation row, its file in the data dir checked once per process."""
    installation = installation_row()
    if (str(settings.DATA_DIR), installation.uuid) not in _mirrored:
        identity_file_sync(installation)
        _mirrored.add((str(settings.DATA_DIR), installation.uuid))
    return installation


def installation_row() -> Installation:
    """The row the migration made (made here if a flushed database lost it)."""
    installation = Installation.objects.filter(singleton=True).first()
    if installation is None:
        try:
            with transaction.atomic():
                installation = Installation.objects.create()
        except IntegrityError:  # another process made it first
            installation = Installation.objects.get(singleton=True)
        logger.info("new installation identity %s", installation.uuid)
    return installation


def identity_file_sync(installation: Installation) -> str:
    """Write DATA_DIR/installation.json from the database; say what was done. The database is
    the authority: a data dir that names another installation (a fresh database on an old data
    dir, or a restored database on a new one) is rewritten, and that is logged."""
    path = Path(settings.DATA_DIR) / IDENTITY_FILE
    recorded = identity_file_read(path)
    if recorded == installation.uuid:
        return f"installation {installation.uuid}"
    if recorded is not None:
        logger.warning(
            "data dir named installation %s, the database is installation %s: the database's identity is kept",
            recorded,
            installation.uuid,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(
        json.dumps(
            {"installation": str(installation.uuid), "created_at": installation.created_at.isoformat()}, indent=2
        )
        + "\n"
    )
    os.replace(temporary, path)
    if recorded is None:
        return f"installation {installation.uuid} (written to {path})"
    return f"installation {installation.uuid} (the data dir named {recorded}; rewritten from the database)"


def identity_file_read(path: Path) -> uuid.UUID | None:
    try:
        return uuid.UUID(json.loads(path.read_text())["installation"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError):
        logger.warning("%s is unreadable; it is rewritten from the database", path.name)
        return None


def result_identity(result: InferenceResult) -> ResultIdentity:
    return ResultIdentity(
        installation=installation_current().uuid,
        result=result.uid,
        uid_root=result.uid_root,
        legacy_seed=result.legacy_uid_seed,
    )


def hl7_control_id(installation: Installation) -> str:
    """A new MSH-10: unique per delivery, and naming the installation that sent it."""
    return (installation.tag + base32(secrets.token_bytes(10)))[:HL7_CONTROL_ID_LENGTH]
