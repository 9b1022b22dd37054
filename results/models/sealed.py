"""Moved to routing/models/sealed.py, where poll sources (routing never imports results) can use it
too. Kept for migration 0005 and existing imports."""

from routing.models.sealed import (
    KEY_FILE_NAME,
    SECRET_UNREADABLE,
    SealedSecretField,
    UnreadableSecret,
    _fernet,
    seal,
    unseal,
)

__all__ = ["KEY_FILE_NAME", "SECRET_UNREADABLE", "SealedSecretField", "UnreadableSecret", "_fernet", "seal", "unseal"]
