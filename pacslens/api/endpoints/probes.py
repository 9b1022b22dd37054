"""The Test buttons and the integration assessment of the endpoints page: C-ECHO an AE title,
probe a destination with its credentials (an OAuth token fetched first), test a poll source, and
assess a node as `manage.py assess` does. Each calls the function the staff page calls
(pacslens/ops/endpoint_tests.py): the same probe, the same audit row, and for a destination the
same last-test fields the dashboard reads.

A test that could not be made (no address, an incomplete destination) answers 409 with the
page's message, after the audit row (and a destination's failed last test) the page records too.
"""

from __future__ import annotations

from django.http import HttpRequest
from django.shortcuts import get_object_or_404
from django.utils import timezone
from ninja import Router

from pacslens.api import schemas
from pacslens.api.auth import require
from pacslens.api.problems import Problem
from pacslens.ops import endpoint_tests
from pacslens.ops.probes import ProbeResult
from results.models import Destination
from routing.models import ApplicationEntity, PollSource

router = Router(tags=["tests and assessment"])
# As the staff views' staff_view(...) (pacslens/staff/views/endpoints.py, destinations.py).
AE_TEST = ("routing.change_applicationentity",)
AE_ASSESS = ("routing.change_applicationentity",)
DESTINATION_TEST = ("results.change_destination",)
POLL_SOURCE_TEST = ("routing.change_pollsource",)


def _answer(result: ProbeResult | None, problem: str) -> dict:
    if result is None:
        raise Problem(409, problem)
    status = {True: "success", False: "failed", None: "inconclusive"}[result.ok]
    return {
        "status": status,
        "ok": result.ok,
        "name": result.name,
        "summary": result.summary,
        "code": result.code,
        "reason": result.reason,
        "details": result.details,
        "seconds": round(result.seconds, 4),
        "tested_at": timezone.now(),
        "in_words": result.in_words(),
    }


@router.post(
    "/config/ae-titles/{int:object_id}/test", response=schemas.ProbeOutcome, summary="Test an AE title (C-ECHO)"
)
def ae_title_test(request: HttpRequest, object_id: int):
    """C-ECHO the node from our AE title, as the endpoints page's Test button."""
    client = require(request, *AE_TEST)
    entity = get_object_or_404(ApplicationEntity, pk=object_id)
    return _answer(*endpoint_tests.ae_test(entity, actor=client.actor, request=request))


@router.post(
    "/config/destinations/{int:object_id}/test",
    response=schemas.ProbeOutcome,
    summary="Test a destination (with its credentials)",
)
def destination_test(request: HttpRequest, object_id: int):
    """C-ECHO, MLLP connect, or an authenticated QIDO-RS / FHIR metadata request (an OAuth token
    fetched first). The outcome becomes the destination's last test, as from the Test button."""
    client = require(request, *DESTINATION_TEST)
    destination = get_object_or_404(Destination.objects.select_related("application_entity"), pk=object_id)
    return _answer(*endpoint_tests.destination_test(destination, actor=client.actor, request=request))


@router.post("/config/poll-sources/{int:object_id}/test", response=schemas.ProbeOutcome, summary="Test a poll source")
def poll_source_test(request: HttpRequest, object_id: int):
    """C-ECHO the PACS of a DIMSE source, or a QIDO-RS request to a DICOMweb one."""
    client = require(request, *POLL_SOURCE_TEST)
    source = get_object_or_404(PollSource.objects.select_related("pacs"), pk=object_id)
    return _answer(*endpoint_tests.poll_source_test(source, actor=client.actor, request=request))


@router.post(
    "/config/ae-titles/{int:object_id}/assess",
    response=schemas.Assessment,
    summary="Assess an AE title (manage.py assess)",
)
def ae_title_assess(request: HttpRequest, object_id: int):
    """Every probe of `manage.py assess` against the node (nothing is stored in it): which
    ingestion and result patterns work and what the site's IT team must configure; `report` is
    the text the Assess page shows, the other keys are `manage.py assess --json`'s."""
    client = require(request, *AE_ASSESS)
    entity = get_object_or_404(ApplicationEntity, pk=object_id)
    report = endpoint_tests.ae_assess(entity, actor=client.actor, request=request)
    if report is None:
        raise Problem(409, f"This AE title has no {entity.missing_address}: edit it to add one, then assess again.")
    return {**report.as_dict(), "report": report.as_text()}
