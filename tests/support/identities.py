"""Result identities and payloads for the protocol tests: stable per label, as a result row's would be."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from results.deliver.payload import Priority, ResultIdentity, ResultPayload

# The installation the payload tests pretend to be; any fixed UUID serves.
TEST_INSTALLATION = uuid.UUID("6f1c2a4e-3b5d-4c7e-9a8b-0d1e2f3a4b5c")


def identity(label: str, *, installation: uuid.UUID = TEST_INSTALLATION, uid_root: str = "") -> ResultIdentity:
    return ResultIdentity(installation=installation, result=uuid.uuid5(uuid.NAMESPACE_OID, label), uid_root=uid_root)


def result_payload(**overrides: Any) -> ResultPayload:
    """A flagged STAT result (study ...77, ACC0077) as the SR/HL7/FHIR builders get it; override what a test needs."""
    values: dict[str, Any] = dict(
        study_instance_uid="1.2.826.0.1.3680043.8.498.77",
        accession_number="ACC0077",
        patient_id="PID-77",
        patient_name="Doe^Jane",
        triage_score=0.8731,
        finding_flag=True,
        model_name="demo-ich",
        model_version="1.2.0",
        identity=identity("result-77"),
        created_at=dt.datetime(2024, 1, 1, 12, 5, 30, tzinfo=dt.UTC),
        priority=Priority.STAT,
    )
    values.update(overrides)
    return ResultPayload(**values)
