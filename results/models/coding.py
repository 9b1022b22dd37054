"""A destination's coding profile: the identifier systems, codes and field placements its
receiver must match (docs/fhir-mapping.md, docs/hl7-mapping.md).

One optional row per destination; a destination without one sends the defaults, which are
what PacsLens sent before profiles existed (results/deliver/coding.py keeps them equal to the
builders' own defaults, and tests/test_coding_profiles.py checks that). The profile in force
when a delivery is created is copied onto the Delivery row (`Delivery.coding`), so re-sends of
that delivery send exactly what its first attempt sent, whatever the profile says later.

Field checks here are the cheap, local ones; `results.deliver.coding.coding_profile_problems`
builds a sample message, resource and SR with the profile and reports what does not validate.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models

# FHIR `uri`: a scheme, a colon, no whitespace (urn:oid:..., urn:uuid:..., https://...).
uri_validator = RegexValidator(r"^[A-Za-z][A-Za-z0-9+.\-]*:\S+$", "Enter an absolute URI (https://... or urn:...).")
# FHIR `code`: no leading, trailing or doubled whitespace.
fhir_code_validator = RegexValidator(r"^\S+( \S+)*$", "A FHIR code has no leading, trailing or double spaces.")
# DICOM SH (code values, designators): no backslash, no control characters.
dicom_short_validator = RegexValidator(r"^[^\\\x00-\x1f]*$", "No backslash or control characters.")

# Where an HL7 message may carry the accession number as placer / filler order number or
# placer field 2, besides the destination's own accession field.
ORDER_NUMBER_FIELDS = ("ORC-2", "ORC-3", "OBR-2", "OBR-3", "OBR-19")


class StudyUidPlacement(models.TextChoices):
    NONE = "", "Not sent"
    ZDS = "zds", "ZDS segment (IHE scheduled workflow)"
    OBX_RP = "obx-rp", "OBX of type RP (reference pointer)"
    OBX_ST = "obx-st", "OBX of type ST (string)"


class HL7ResultStatus(models.TextChoices):
    PRELIMINARY = "P", "P: preliminary (until a radiologist confirms)"
    FINAL = "F", "F: final"


class CodingProfile(models.Model):
    destination = models.OneToOneField(
        "results.Destination", on_delete=models.CASCADE, primary_key=True, related_name="coding_profile"
    )

    # --- FHIR ---
    fhir_patient_identifier_system = models.CharField(
        "Patient identifier system",
        max_length=255,
        blank=True,
        validators=[uri_validator],
        help_text="Patient.identifier.system of the RIS (MRN)",
    )
    fhir_accession_identifier_system = models.CharField(
        "Accession identifier system",
        max_length=255,
        blank=True,
        validators=[uri_validator],
        help_text="System of the accession identifier (ACSN)",
    )
    fhir_study_identifier_system = models.CharField(
        "Study identifier system",
        max_length=255,
        default="urn:dicom:uid",
        validators=[uri_validator],
        help_text="ImagingStudy identifier system: urn:dicom:uid sends urn:oid:<UID>, any other the bare UID",
    )
    fhir_observation_identifier_system = models.CharField(
        "Observation identifier system",
        max_length=255,
        blank=True,
        validators=[uri_validator],
        help_text="System of our Observation identifier (empty: urn:uuid values, or PACSLENS_FHIR_IDENTIFIER_SYSTEM)",
    )
    fhir_code_system = models.CharField(
        "Code system",
        max_length=255,
        default="http://pacslens.local/fhir/CodeSystem/ai-triage",
        validators=[uri_validator],
    )
    fhir_score_code = models.CharField("Score code", max_length=64, default="PL0001", validators=[fhir_code_validator])
    fhir_score_display = models.CharField("Score display", max_length=200, default="AI triage score")
    fhir_flag_code = models.CharField("Finding code", max_length=64, default="PL0002", validators=[fhir_code_validator])
    fhir_flag_display = models.CharField("Finding display", max_length=200, default="AI triage finding")
    fhir_result_extension_url = models.CharField(
        "Result extension URL",
        max_length=255,
        default="http://pacslens.local/fhir/StructureDefinition/ai-triage-result",
        validators=[uri_validator],
        help_text="URL of the ImagingStudy extension that points to the Observation",
    )

    # --- HL7 v2 (MSH-3..6, the version and the main accession field are on the destination) ---
    hl7_patient_id_authority = models.CharField(
        "PID-3 assigning authority", max_length=50, blank=True, help_text="PID-3.4 assigning authority (namespace id)"
    )
    hl7_patient_id_type = models.CharField(
        "PID-3 identifier type", max_length=5, blank=True, help_text="PID-3.5 identifier type, e.g. MR"
    )
    hl7_order_number_fields = models.CharField(
        "Accession number also in",
        max_length=40,
        blank=True,
        help_text=f"Also put the accession number, as order number, in: comma-separated {', '.join(ORDER_NUMBER_FIELDS)}",
    )
    hl7_order_control = models.CharField(
        "ORM order control",
        max_length=2,
        default="XO",
        choices=[("XO", "XO: change order"), ("SC", "SC: status changed")],
        help_text="ORC-1 of ORM^O01",
    )
    hl7_service_code = models.CharField("Service code", max_length=20, default="PACSLENS-AI", help_text="OBR-4.1")
    hl7_service_text = models.CharField(
        "Service text", max_length=199, default="PacsLens AI triage", help_text="OBR-4.2"
    )
    hl7_service_coding_system = models.CharField(
        "Service coding system", max_length=20, default="L", help_text="OBR-4.3"
    )
    hl7_coding_system = models.CharField(
        "OBX coding system", max_length=20, default="99PACSLENS", help_text="OBX-3.3 of score and finding"
    )
    hl7_score_code = models.CharField("Score code", max_length=20, default="PL0001", help_text="OBX-3.1 of the score")
    hl7_score_text = models.CharField("Score text", max_length=199, default="AI triage score")
    hl7_flag_code = models.CharField(
        "Finding code", max_length=20, default="PL0002", help_text="OBX-3.1 of the finding"
    )
    hl7_flag_text = models.CharField("Finding text", max_length=199, default="AI triage finding")
    hl7_result_status = models.CharField(
        "Result status",
        max_length=1,
        choices=HL7ResultStatus.choices,
        default=HL7ResultStatus.PRELIMINARY,
        help_text="OBR-25 and OBX-11 (a result confirmed as final is always F)",
    )
    hl7_study_uid = models.CharField(
        "Study Instance UID in",
        max_length=6,
        blank=True,
        choices=StudyUidPlacement.choices,
        default=StudyUidPlacement.NONE,
        help_text="Where the message carries the Study Instance UID",
    )

    # --- DICOM SR ---
    sr_scheme_designator = models.CharField(
        "Coding scheme designator",
        max_length=16,
        default="99PACSLENS",
        validators=[dicom_short_validator],
        help_text="Coding Scheme Designator: 99... for a private scheme",
    )
    sr_scheme_version = models.CharField(
        "Coding scheme version", max_length=16, blank=True, validators=[dicom_short_validator]
    )
    sr_scheme_name = models.CharField("Coding scheme name", max_length=64, default="PacsLens local codes")
    sr_scheme_organization = models.CharField("Coding scheme organisation", max_length=64, default="PacsLens")
    sr_score_code = models.CharField(
        "Score code value", max_length=16, default="PL0001", validators=[dicom_short_validator]
    )
    sr_score_meaning = models.CharField("Score code meaning", max_length=64, default="AI triage score")
    sr_flag_code = models.CharField(
        "Finding code value", max_length=16, default="PL0002", validators=[dicom_short_validator]
    )
    sr_flag_meaning = models.CharField("Finding code meaning", max_length=64, default="AI triage finding")

    def __str__(self) -> str:
        return f"for {self.destination.name}"

    # The fields a destination of each kind uses (the page shows only those; YAML exports them).
    KIND_PREFIX = {"dicom": "sr_", "dicomweb": "sr_", "hl7": "hl7_", "fhir": "fhir_"}

    @classmethod
    def value_fields(cls) -> list[str]:
        return [f.name for f in cls._meta.get_fields() if isinstance(f, models.Field) and f.name != "destination"]

    @classmethod
    def fields_for_kind(cls, kind: str) -> list[str]:
        prefix = cls.KIND_PREFIX.get(kind, "")
        return [name for name in cls.value_fields() if name.startswith(prefix)] if prefix else []

    def snapshot(self) -> dict[str, Any]:
        """The values a delivery keeps (Delivery.coding): every field, defaults included."""
        return {name: getattr(self, name) for name in self.value_fields()}

    @property
    def order_number_fields(self) -> list[str]:
        return [part.strip() for part in self.hl7_order_number_fields.split(",") if part.strip()]

    def clean(self) -> None:
        errors: dict[str, str] = {}
        unknown = [f for f in self.order_number_fields if f not in ORDER_NUMBER_FIELDS]
        if unknown:
            errors["hl7_order_number_fields"] = (
                f"Unknown field {', '.join(unknown)}: use any of {', '.join(ORDER_NUMBER_FIELDS)}."
            )
        if self.sr_score_code and self.sr_score_code == self.sr_flag_code:
            errors["sr_flag_code"] = "The score and the finding need different codes."
        if self.hl7_score_code and self.hl7_score_code == self.hl7_flag_code:
            errors["hl7_flag_code"] = "The score and the finding need different codes."
        if self.fhir_score_code and self.fhir_score_code == self.fhir_flag_code:
            errors["fhir_flag_code"] = "The score and the finding need different codes."
        if errors:
            raise ValidationError(errors)
