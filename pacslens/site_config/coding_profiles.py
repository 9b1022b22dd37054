"""The `coding_profiles` section of the site YAML: per destination, the identifier systems,
codes and field placements its receiver must match (results/models/coding.py).

    coding_profiles:
    - destination: ris                  # a destinations entry
      hl7_patient_id_authority: HOSP
      hl7_patient_id_type: MR
      hl7_order_number_fields: ORC-2, OBR-2
      hl7_study_uid: zds
      ...

An entry takes the fields of its destination's kind only (fhir_* for FHIR, hl7_* for HL7,
sr_* for DICOM and DICOMweb); fields left out keep their defaults. A destination without an
entry sends the defaults. Export writes every field of the kind, so the file shows what is sent.
Import builds a sample message, resource or SR with each profile and refuses what would not
validate. With --prune, profiles of destinations the file leaves out go back to the defaults.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction

from pacslens.site_config.checks import clean_problems, entries_labelled
from pacslens.site_config.destinations import destination_from_entry
from results.deliver.coding import coding_profile_problems
from results.models import CodingProfile, Destination


class CodingProfilesSection:
    name = "coding_profiles"
    needs_document = True

    def export(self) -> list[dict[str, Any]]:
        entries = []
        for profile in CodingProfile.objects.select_related("destination").order_by("destination__name"):
            fields = CodingProfile.fields_for_kind(profile.destination.kind)
            entries.append({"destination": profile.destination.name, **{f: getattr(profile, f) for f in fields}})
        return entries

    def validate(self, entries: list[Any], *, document: dict[str, Any] | None = None) -> list[str]:
        in_file = {
            e.get("name"): e
            for e in (document or {}).get("destinations") or []
            if isinstance(e, dict) and e.get("name")
        }
        problems: list[str] = []
        for label, entry in entries_labelled(self.name, entries, problems, key=lambda e: e.get("destination")):
            name = entry.get("destination")
            destination: Destination | None = None
            if not isinstance(name, str):
                problems.append(f"{label}: field 'destination': give the name of a destination")
                continue
            if name in in_file:
                destination, _ = destination_from_entry(in_file[name], resolve_ae=False)
            else:
                destination = Destination.objects.filter(name=name).first()
            if destination is None:
                problems.append(f"{label}: field 'destination': no destination {name!r} here or in destinations")
                continue
            allowed = CodingProfile.fields_for_kind(destination.kind)
            unknown = sorted(set(entry) - {"destination"} - set(CodingProfile.value_fields()))
            foreign = sorted(set(entry) - {"destination"} - set(unknown) - set(allowed))
            if unknown:
                problems.append(f"{label}: unknown field(s) {', '.join(unknown)}")
            if foreign:
                problems.append(
                    f"{label}: field(s) {', '.join(foreign)} do not apply to a {destination.kind} destination"
                )
            if unknown or foreign:
                continue
            profile = _profile(entry, destination)
            found = clean_problems(profile, label, exclude=["destination"])
            problems.extend(found)
            if not found:
                problems.extend(f"{label}: {problem}" for problem in coding_profile_problems(profile, destination))
        return problems

    def apply(self, entries: list[dict[str, Any]], *, prune: bool) -> dict[str, int]:
        created = updated = 0
        names = []
        with transaction.atomic():
            for entry in entries:
                destination = Destination.objects.get(name=entry["destination"])
                profile = _profile(entry, destination)
                was_new = profile._state.adding
                profile.full_clean(validate_unique=False, validate_constraints=False)
                profile.save()
                created += was_new
                updated += not was_new
                names.append(destination.name)
            deleted = 0
            if prune:
                deleted, _ = CodingProfile.objects.exclude(destination__name__in=names).delete()
        return {"created": created, "updated": updated, "deleted": deleted}


def _profile(entry: dict[str, Any], destination: Destination) -> CodingProfile:
    """The profile as the entry would make it: the stored one (or the defaults) with the entry's values."""
    profile = CodingProfile.objects.filter(destination__name=destination.name).first() or CodingProfile()
    profile.destination = destination
    for field_name, value in entry.items():
        if field_name != "destination":
            setattr(profile, field_name, "" if value is None else value)
    return profile
