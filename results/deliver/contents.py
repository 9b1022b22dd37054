"""What one delivery sends, and under which key.

`result_payload` turns a result row into the protocol-free `ResultPayload` the SR/HL7/FHIR
builders take; `delivery_identifier` mints a new delivery's idempotency key (once, when its row
is written); `delivery_key` is what a sender sends under on every attempt, read from the row.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings

from results.deliver.coding import fhir_observation_system
from results.deliver.identity import hl7_control_id, installation_current, result_identity
from results.deliver.payload import (
    SR_SOP_INSTANCE,
    URI_SYSTEM,
    Priority,
    ResultPayload,
    fhir_observation_identifier,
)
from results.models import Delivery, Destination, InferenceResult


def result_payload(*, result: InferenceResult) -> ResultPayload:
    study = result.study
    sources = []
    key_image: Path | None = None
    key_bbox = None
    series = result.series
    if series is not None:
        # The SR cites the images the model evaluated (older results: the whole input series).
        instances = series.instances.filter(deleted_at=None)
        if result.evaluated_instances:
            instances = instances.filter(pk__in=result.evaluated_instances)
        rows = list(instances.order_by("instance_number", "pk").values_list("pk", "path"))
        sources = [Path(settings.DATA_DIR) / path for _, path in rows]
        # The key slice: where the finding is, else the middle of what the model read.
        region = result.key_region or {}
        key_path = dict(rows).get(int(region.get("instance", 0)))
        if key_path is not None:
            key_image = Path(settings.DATA_DIR) / key_path
            key_bbox = tuple(region["bbox"])
        elif sources:
            key_image = sources[len(sources) // 2]
    assert result.score is not None  # only scored results are delivered
    return ResultPayload(
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        triage_score=float(result.score),
        finding_flag=bool(result.flagged),
        model_name=result.model_name,
        model_version=result.model_version,
        identity=result_identity(result),
        created_at=result.created_at,
        # The worklist priority the AI asks for: a flagged finding goes to the top.
        priority=Priority.STAT if result.flagged else Priority.ROUTINE,
        source_instances=tuple(sources),
        key_image=key_image,
        key_bbox=key_bbox,
        finding=result.label,
    )


def delivery_identifier(*, result: InferenceResult, destination: Destination) -> tuple[str, str]:
    """(system, idempotency key) of a new delivery: fixed when the row is created and read from
    the row on every re-send. SR: the SOP Instance UID (one per result, whichever PACS gets it);
    HL7: a new MSH-10 per delivery; FHIR: the Observation identifier (one per result)."""
    if destination.kind in ("dicom", "dicomweb"):
        return "", str(result_identity(result).uid(SR_SOP_INSTANCE))
    if destination.kind == "hl7":
        return "", hl7_control_id(installation_current())
    return fhir_observation_identifier(result_identity(result), system=fhir_observation_system(destination))


def delivery_key(delivery: Delivery) -> str | tuple[str, str]:
    """What a sender sends under: the row's idempotency key; for FHIR with its identifier system."""
    if delivery.destination.kind == "fhir":
        return (delivery.identifier_system or URI_SYSTEM, delivery.idempotency_key)
    return delivery.idempotency_key
