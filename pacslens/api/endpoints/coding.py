"""A destination's coding profile: the identifier systems, codes and field placements its
receiver must match. It reads and writes as the destination's entry of the site YAML's
`coding_profiles` section and a write is validated by that section (a sample message, resource
or SR is built with the profile and must validate), as `import_config` validates a file. The
entry carries an ETag; PUT requires `If-Match` (412 when it changed, 428 without). Permissions
and the audit row are the coding profile page's."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from ninja import Body, Router

from pacslens.api import schemas
from pacslens.api.auth import require
from pacslens.api.endpoints.config import entry_etag, problems_detail
from pacslens.api.problems import Problem, config_problems
from pacslens.site_config.coding_profiles import CodingProfilesSection
from results.models import CodingProfile, Destination
from routing.models import AuditAction, AuditEntry
from routing.models.audit import config_snapshot

router = Router(tags=["configuration"])
# As the coding profile page (pacslens/staff/views/coding.py).
CODING = ("results.view_destination", "results.change_destination")


def _profile_of(destination: Destination) -> CodingProfile:
    """The stored profile, or the defaults a destination without one sends (as the page)."""
    return CodingProfile.objects.filter(destination=destination).first() or CodingProfile(destination=destination)


def coding_entry(destination: Destination) -> dict[str, Any]:
    """The destination's `coding_profiles` entry, as export writes it (the defaults when none is stored)."""
    profile = _profile_of(destination)
    fields = CodingProfile.fields_for_kind(destination.kind)
    return {"destination": destination.name, **{f: getattr(profile, f) for f in fields}}


def _answer(destination: Destination, response: HttpResponse) -> dict[str, Any]:
    entry = coding_entry(destination)
    response["ETag"] = entry_etag(entry)
    stored = CodingProfile.objects.filter(destination=destination).exists()
    return {"id": destination.pk, "etag": entry_etag(entry), "stored": stored, "entry": entry}


@router.get(
    "/config/destinations/{int:object_id}/coding",
    response=schemas.CodingProfileObject,
    summary="Read a destination's coding profile",
)
def destination_coding_read(request: HttpRequest, response: HttpResponse, object_id: int):
    """The fields of the destination's kind (fhir_* for FHIR, hl7_* for HL7, sr_* for DICOM and
    DICOMweb); `stored` is false while it sends the defaults."""
    require(request, *CODING)
    return _answer(get_object_or_404(Destination, pk=object_id), response)


@router.put(
    "/config/destinations/{int:object_id}/coding",
    response=schemas.CodingProfileObject,
    summary="Replace a destination's coding profile",
)
def destination_coding_replace(
    request: HttpRequest,
    response: HttpResponse,
    object_id: int,
    entry: dict[str, Any] = Body(...),  # noqa: B008
):
    """The whole entry (`destination` may be left out); fields left out go back to their
    defaults. Validated as the site YAML's `coding_profiles` section validates it. Needs `If-Match`."""
    client = require(request, *CODING)
    if not isinstance(entry, dict):
        raise Problem(422, "The body must be a JSON object: an entry of the site YAML's coding_profiles.")
    section = CodingProfilesSection()
    with transaction.atomic():
        destination = get_object_or_404(Destination.objects.select_for_update(), pk=object_id)
        given = request.headers.get("If-Match")
        if not given:
            raise Problem(428, "Send If-Match with the ETag you read, so a change made meanwhile is not overwritten.")
        current = entry_etag(coding_entry(destination))
        if given.strip() != "*" and current not in [tag.strip() for tag in given.split(",")]:
            raise Problem(
                412,
                "It was changed since you read it: read it again and re-apply your change.",
                headers={"ETag": current},
            )
        if entry.get("destination", destination.name) != destination.name:
            raise Problem(
                422,
                "destination: the entry is of another destination.",
                errors=[("destination", f"This is {destination.name}'s profile: leave it out or give that name.")],
            )
        defaults = CodingProfile()
        full = {
            "destination": destination.name,
            **{f: getattr(defaults, f) for f in CodingProfile.fields_for_kind(destination.kind)},
            **{k: v for k, v in entry.items() if k != "destination"},
        }
        label = f"coding_profiles[0] ({destination.name!r})"
        problems = section.validate([full], document={"pacslens_config": 1, "coding_profiles": [full]})
        if problems:
            raise Problem(422, problems_detail(problems, label), errors=config_problems(problems, label=label))
        before = config_snapshot(_profile_of(destination))
        section.apply([full], prune=False)
        saved = CodingProfile.objects.get(destination=destination)
        AuditEntry.record(
            actor=client.actor,
            action=AuditAction.UPDATE,
            obj=saved,
            object_repr=str(saved),
            before=before,
            after=config_snapshot(saved),
            request=request,
        )
    return _answer(destination, response)
