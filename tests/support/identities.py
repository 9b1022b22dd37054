"""Result identities for payload tests: stable per label, as a result row's would be."""

from __future__ import annotations

import uuid

from results.deliver.payload import ResultIdentity

# The installation the payload tests pretend to be; any fixed UUID serves.
TEST_INSTALLATION = uuid.UUID("6f1c2a4e-3b5d-4c7e-9a8b-0d1e2f3a4b5c")


def identity(label: str, *, installation: uuid.UUID = TEST_INSTALLATION, uid_root: str = "") -> ResultIdentity:
    return ResultIdentity(installation=installation, result=uuid.uuid5(uuid.NAMESPACE_OID, label), uid_root=uid_root)
