"""A PACS to poll: Orthanc known to us as a queryable AE, studies in it dated as a test needs,
and the few steps of a poll the pull tests (DIMSE, DICOMweb, backfill) share.

The studies carry a sentinel patient (`PATIENT_NAME`, `PATIENT_ID`) that must never show up
in a Poll row, an error or a log line: `assert_no_patient_data` checks. The `pacs` fixture is
registered in conftest.
"""

from __future__ import annotations

import pytest
from django.utils import timezone
from django_q.models import OrmQ

from routing.models import ApplicationEntity, Poll, PollSource
from routing.pull.poll import poll_source, source_claim
from tests.support.ct import make_ct_slices
from tests.support.dicom_files import part10_bytes
from tests.support.net import free_port

OUR_AE = "PACSLENS"
# Patient data that must never show up in a Poll row, an error or a log line.
PATIENT_NAME, PATIENT_ID = "Sentinel^Leak", "PIDSENTINEL9"


def orthanc_study(orthanc, count: int = 3, *, when=None) -> str:
    """Store a new study in Orthanc (REST upload, not DIMSE), dated `when` (default now)."""
    when = timezone.localtime(when or timezone.now())
    slices = make_ct_slices(count, patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    for ds in slices:
        ds.StudyDate, ds.StudyTime = f"{when:%Y%m%d}", f"{when:%H%M%S}"
        orthanc.upload(part10_bytes(ds))
    return str(slices[0].StudyInstanceUID)


def route_study_tasks() -> list[tuple]:
    return [q.task["args"] for q in OrmQ.objects.all() if q.task.get("func") == "routing.tasks.route_study"]


def poll_now(source: PollSource) -> Poll:
    """Poll regardless of spacing (tests only): clear the last query time, claim, poll."""
    PollSource.objects.filter(pk=source.pk).update(last_query_at=None, lease_until=None)
    claimed = source_claim(source_id=source.pk)
    assert claimed is not None
    return poll_source(source=claimed)


def assert_no_patient_data(*texts: str) -> None:
    for text in texts:
        assert PATIENT_NAME not in text and "Sentinel" not in text and PATIENT_ID not in text


@pytest.fixture
def pacs(transactional_db, data_dir, orthanc, settings):
    """Orthanc emptied, known to us as a PACS we may query (and that may store to us)."""
    settings.AE_TITLE = OUR_AE
    orthanc.clear()
    # Orthanc answers queries only from AEs it knows (the listener fixture sets the real port).
    orthanc.add_modality("pacslens", OUR_AE, "127.0.0.1", free_port())
    return ApplicationEntity.objects.create(
        ae_title=orthanc.aet, host=orthanc.host, port=orthanc.dicom_port, may_query=True, may_send=True
    )


def make_source(pacs, **fields) -> PollSource:
    values = {"name": "orthanc", "pacs": pacs, "interval_seconds": 60, "min_query_spacing_seconds": 0}
    values.update(fields)
    source = PollSource(**values)
    source.full_clean()
    source.save()
    return source
