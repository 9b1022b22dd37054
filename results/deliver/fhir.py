"""FHIR R4 result delivery: an Observation with the triage score and flag, and an update of
the ImagingStudy (found by its `urn:dicom:uid` identifier) that points to it.

Models come from `fhir.resources.R4B` (FHIR 4.3.0): fhir.resources 8.x has no plain R4
package and its default `fhir.resources` models are R5. R4B changed no element of
Observation or ImagingStudy relative to R4, so these bodies are valid R4. The mapping, with
example bodies, is in docs/fhir-mapping.md.

Re-sends never duplicate: the Observation is created with `If-None-Exist` on an identifier
unique to the result (results/deliver/identity.py), and the ImagingStudy is written with a conditional
update. The RIS's ImagingStudy is merged as JSON, not through a model round trip: every element
we do not own goes back exactly as the RIS sent it (decimals like `1.50` and datetimes like
`...00.120+01:00` keep their text), which is why bodies go through simplejson with decimals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import requests
import simplejson
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation

from results.deliver.payload import (
    URI_SYSTEM,
    Outcome,
    OutcomeKind,
    Protocol,
    ResultPayload,
)

DICOM_UID_SYSTEM = "urn:dicom:uid"
UCUM = "http://unitsofmeasure.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
FHIR_JSON = "application/fhir+json"
DEFAULT_TIMEOUT_S = 30.0
# Our answers are one resource or a one-entry Bundle; more than this is not a FHIR server answering.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


class FHIRBuildError(ValueError):
    """A resource does not validate: permanent for this result."""


@dataclass(frozen=True)
class FHIRSettings:
    """Per-destination mapping choices; the defaults are documented in docs/fhir-mapping.md."""

    code_system: str = "http://pacslens.local/fhir/CodeSystem/ai-triage"
    score_code: str = "PL0001"
    score_display: str = "AI triage score"
    flag_code: str = "PL0002"
    flag_display: str = "AI triage finding"
    patient_identifier_system: str = ""
    accession_identifier_system: str = ""
    # urn:dicom:uid identifies the study by urn:oid:<UID>; a site's own system by the bare UID.
    study_identifier_system: str = DICOM_UID_SYSTEM
    result_extension_url: str = "http://pacslens.local/fhir/StructureDefinition/ai-triage-result"


Identifier = tuple[str, str]  # (system, value)


def observation_identifier(payload: ResultPayload, identifier: Identifier | None = None) -> Identifier:
    """(system, value) of the Observation: the one the delivery row recorded, else the result's."""
    return identifier or payload.fhir_observation_identifier


def study_identifier(payload: ResultPayload, settings: FHIRSettings = FHIRSettings()) -> Identifier:
    system = settings.study_identifier_system or DICOM_UID_SYSTEM
    if system == DICOM_UID_SYSTEM:
        return system, f"urn:oid:{payload.study_instance_uid}"
    return system, payload.study_instance_uid


def build_observation(
    payload: ResultPayload, settings: FHIRSettings = FHIRSettings(), *, identifier: Identifier | None = None
) -> dict[str, Any]:
    system, value = observation_identifier(payload, identifier)
    study_system, study_value = study_identifier(payload, settings)
    model = f"{payload.model_name} {payload.model_version}"
    body = {
        "resourceType": "Observation",
        "identifier": [{"system": system, "value": value}],
        "status": "final" if payload.is_final else "preliminary",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
        "code": _concept(settings.code_system, settings.score_code, settings.score_display),
        "subject": _patient_reference(payload, settings),
        "effectiveDateTime": payload.created_at.isoformat(),
        "issued": payload.created_at.isoformat(),
        "valueQuantity": {"value": round(payload.triage_score, 6), "unit": "score", "system": UCUM, "code": "{score}"},
        "component": [
            {
                "code": _concept(settings.code_system, settings.flag_code, settings.flag_display),
                "valueBoolean": payload.finding_flag,
            }
        ],
        "derivedFrom": [{"type": "ImagingStudy", "identifier": {"system": study_system, "value": study_value}}],
        # A Device resource per model would need managing at the RIS; the display names it.
        "device": {
            "display": f"{model} (PacsLens)",
            "identifier": {
                "system": URI_SYSTEM,
                "value": "urn:oid:" + payload.identity.device_uid(payload.model_name, payload.model_version),
            },
        },
        "note": [
            {"text": f"PacsLens AI triage result from model {model}; not a diagnosis, for worklist prioritisation."}
        ],
    }
    return _validated(Observation, body, payload)


def build_imaging_study(
    payload: ResultPayload,
    settings: FHIRSettings = FHIRSettings(),
    *,
    observation_id: str | None = None,
    existing: dict[str, Any] | None = None,
    identifier: Identifier | None = None,
) -> dict[str, Any]:
    """The ImagingStudy to PUT: `existing` (the RIS's copy, as parsed JSON) with our identifiers
    and result extension merged in, or a minimal one when the RIS has none. Merging matters
    because PUT replaces the whole resource and the RIS's series and instance details must
    survive; we add only what we own and leave every other element as the RIS sent it."""
    if existing:
        # The RIS's copy must be an ImagingStudy before we merge into it (a malformed one is permanent).
        _validated(ImagingStudy, existing, payload)
    study_system, study_value = study_identifier(payload, settings)
    obs_system, obs_value = observation_identifier(payload, identifier)
    body: dict[str, Any] = (
        dict(existing)
        if existing
        else {
            "resourceType": "ImagingStudy",
            "status": "available",
            "subject": _patient_reference(payload, settings),
        }
    )
    # Server-managed version and time would only confuse the update; tags, profiles and
    # security labels are the RIS's and stay.
    meta = {k: v for k, v in body.get("meta", {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        body["meta"] = meta
    else:
        body.pop("meta", None)
    identifiers = list(body.get("identifier", []))
    wanted = [{"system": study_system, "value": study_value}]
    if payload.accession_number:
        accession: dict[str, Any] = {
            "type": _concept(V2_0203, "ACSN", "Accession ID"),
            "value": payload.accession_number,
        }
        if settings.accession_identifier_system:
            accession["system"] = settings.accession_identifier_system
        # The RIS's own accession identifier, under whatever system it uses, is the same one.
        if not any(_is_accession(other, payload.accession_number) for other in identifiers):
            wanted.append(accession)
    for wanted_identifier in wanted:
        if not any(_same_identifier(wanted_identifier, other) for other in identifiers):
            identifiers.append(wanted_identifier)
    body["identifier"] = identifiers
    reference: dict[str, Any] = {"type": "Observation", "identifier": {"system": obs_system, "value": obs_value}}
    if observation_id:
        reference["reference"] = f"Observation/{observation_id}"
    extensions = [
        ext
        for ext in body.get("extension", [])
        if not (
            ext.get("url") == settings.result_extension_url
            and _same_identifier(ext.get("valueReference", {}).get("identifier", {}), reference["identifier"])
        )
    ]
    body["extension"] = [*extensions, {"url": settings.result_extension_url, "valueReference": reference}]
    return _validated(ImagingStudy, body, payload)


def send_fhir_result(
    base_url: str,
    payload: ResultPayload,
    *,
    settings: FHIRSettings = FHIRSettings(),
    bearer_token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    session: requests.Session | None = None,
    identifier: Identifier | None = None,
) -> Outcome:
    """Conditionally create the Observation, then conditionally update the ImagingStudy.

    `identifier` is the Observation's (system, value) as the delivery row recorded it (default:
    the result's own). Returns one Outcome keyed by the identifier value: the first failure, or
    success when both writes succeeded. Safe to repeat: neither step duplicates.
    """
    base = base_url.rstrip("/")
    system, value = key_identifier = observation_identifier(payload, identifier)
    key = value
    http = session or requests.Session()
    headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
    if bearer_token:
        headers["Authorization"] = f"Bearer {bearer_token}"
    try:
        observation = build_observation(payload, settings, identifier=key_identifier)
        response = _request(
            http,
            "POST",
            f"{base}/Observation",
            observation,
            timeout,
            {**headers, "If-None-Exist": f"identifier={system}|{value}"},
        )
        if isinstance(response, Outcome) or response.status_code not in (200, 201):
            return _failure(response, f"Observation create at {base}", key)
        if response.status_code == 200 and _derived_from_other_study(response, observation):
            # Never link this study to an Observation about another one (possibly another patient).
            return _outcome(
                OutcomeKind.PERMANENT,
                200,
                key,
                f"{base} already holds an Observation with identifier {value} for another "
                f"study than {payload.study_instance_uid}",
            )
        observation_id = _resource_id(response, "Observation")

        study_system, study_value = study_identifier(payload, settings)
        # One query for both the search and the conditional update, so they match the same.
        search = {"identifier": f"{study_system}|{study_value}"}
        found = _request(http, "GET", f"{base}/ImagingStudy", None, timeout, headers, search)
        if isinstance(found, Outcome) or found.status_code != 200:
            return _failure(found, f"ImagingStudy search at {base}", key)
        entries = _bundle_resources(found, "ImagingStudy")
        if entries is None:
            return _outcome(
                OutcomeKind.PERMANENT, found.status_code, key, f"ImagingStudy search at {base} did not answer a Bundle"
            )
        if len(entries) > 1:
            return _outcome(
                OutcomeKind.PERMANENT,
                412,
                key,
                f"{base} holds {len(entries)} ImagingStudy resources for study {payload.study_instance_uid}",
            )
        study = build_imaging_study(
            payload,
            settings,
            observation_id=observation_id,
            existing=entries[0] if entries else None,
            identifier=key_identifier,
        )
        updated = _request(http, "PUT", f"{base}/ImagingStudy", study, timeout, headers, search)
        if isinstance(updated, Outcome) or updated.status_code not in (200, 201):
            return _failure(updated, f"ImagingStudy update at {base}", key)
    except FHIRBuildError as exc:
        return _outcome(OutcomeKind.PERMANENT, None, key, str(exc))
    finally:
        if session is None:
            http.close()
    return _outcome(OutcomeKind.SUCCESS, updated.status_code, key, f"Observation and ImagingStudy written at {base}")


def classify_http_status(status: int) -> OutcomeKind:
    if 200 <= status < 300:
        return OutcomeKind.SUCCESS
    if status in (401, 403, 404, 405):
        # Credentials or base URL are wrong: staff must fix the destination.
        return OutcomeKind.CONFIG_ERROR
    if status in (408, 429) or status >= 500:
        return OutcomeKind.TRANSIENT
    return OutcomeKind.PERMANENT  # 400, 409, 412, 422 and other client errors


def _request(
    http: requests.Session,
    method: str,
    url: str,
    body: dict[str, Any] | None,
    timeout: float,
    headers: dict[str, str],
    params: dict[str, str] | None = None,
) -> requests.Response | Outcome:
    try:
        response = http.request(
            method,
            url,
            data=dumps(body) if body is not None else None,
            headers=headers,
            params=params,
            timeout=timeout,
            stream=True,
        )
        with response:
            content = bytearray()
            for chunk in response.iter_content(64 * 1024):
                content += chunk
                if len(content) > MAX_RESPONSE_BYTES:
                    return _outcome(
                        OutcomeKind.PERMANENT, response.status_code, "", f"{method} {url} answered over 16 MiB"
                    )
        # What response.content would have read, but bounded; the attribute is requests' own cache.
        response._content = bytes(content)
        return response
    except requests.exceptions.SSLError:
        return _outcome(OutcomeKind.CONFIG_ERROR, None, "", f"TLS error talking to {url}")
    except requests.exceptions.RequestException as exc:
        return _outcome(OutcomeKind.TRANSIENT, None, "", f"{method} {url} failed: {type(exc).__name__}")


def _failure(response: requests.Response | Outcome, what: str, key: str) -> Outcome:
    if isinstance(response, Outcome):
        return Outcome(
            kind=response.kind, protocol=Protocol.FHIR, code=None, key=key, message=f"{what}: {response.message}"
        )
    # OperationOutcome issue codes only: diagnostics text may quote the resource.
    issues = _json_object(response).get("issue")
    codes = ", ".join(
        sorted({str(issue["code"])[:40] for issue in _dicts(issues) if isinstance(issue.get("code"), str)})[:10]
    )
    detail = f" (issue {codes})" if codes else ""
    kind = classify_http_status(response.status_code)
    if kind is OutcomeKind.SUCCESS:
        kind = OutcomeKind.PERMANENT  # a 2xx we did not expect (e.g. 204 to a create)
    return _outcome(kind, response.status_code, key, f"{what} answered {response.status_code}{detail}")


def _bundle_resources(response: requests.Response, resource_type: str) -> list[dict[str, Any]] | None:
    bundle = _json_object(response)
    if bundle.get("resourceType") != "Bundle" or not isinstance(bundle.get("entry", []), list):
        return None
    resources = [entry.get("resource") for entry in _dicts(bundle.get("entry"))]
    return [r for r in _dicts(resources) if r.get("resourceType") == resource_type]


def _resource_id(response: requests.Response, resource_type: str) -> str | None:
    body = _json_object(response)
    if body.get("resourceType") == resource_type and isinstance(body.get("id"), str) and body["id"]:
        return body["id"][:64]
    # Location: [base]/Observation/123/_history/1
    parts = response.headers.get("Location", "").split("/")
    if resource_type in parts and parts.index(resource_type) + 1 < len(parts):
        return parts[parts.index(resource_type) + 1][:64]
    return None


def loads(response: requests.Response) -> Any:
    """A FHIR JSON body with decimals kept as written (`1.50` stays `1.50` when sent back)."""
    return simplejson.loads(response.content, use_decimal=True)


def _json_object(response: requests.Response) -> dict[str, Any]:
    """The body as a JSON object; {} for anything else (not JSON, not an object, nested too deep)."""
    try:
        body = loads(response)
    except (ValueError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The objects in a JSON array (whatever else a server put there is ignored)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def dumps(body: dict[str, Any]) -> str:
    return simplejson.dumps(body, use_decimal=True)


def _derived_from_other_study(response: requests.Response, ours: dict[str, Any]) -> bool:
    """Whether the Observation a conditional create found names another study than ours."""
    # No body to check (a server may answer 200 without one) is no evidence of another study.
    theirs = [ref.get("identifier") for ref in _dicts(_json_object(response).get("derivedFrom"))]
    return bool(theirs) and ours["derivedFrom"][0]["identifier"] not in theirs


def _validated(model: Any, body: dict[str, Any], payload: ResultPayload) -> dict[str, Any]:
    """`body` itself once the model accepts it: validated, never re-serialised."""
    try:
        model.model_validate(body)
    except Exception as exc:
        # pydantic's message quotes input values; keep only the failing locations.
        locations = sorted(
            {".".join(str(part) for part in error["loc"]) for error in getattr(exc, "errors", lambda: [])()}
        )
        raise FHIRBuildError(
            f"{body['resourceType']} for study {payload.study_instance_uid} does not validate "
            f"({', '.join(locations) or type(exc).__name__})"
        ) from None
    return body


def _patient_reference(payload: ResultPayload, settings: FHIRSettings) -> dict[str, Any]:
    identifier = {"value": payload.patient_id}
    if settings.patient_identifier_system:
        identifier["system"] = settings.patient_identifier_system
    return {"type": "Patient", "identifier": identifier}


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _same_identifier(one: dict[str, Any], other: dict[str, Any]) -> bool:
    return one.get("system") == other.get("system") and one.get("value") == other.get("value")


def _is_accession(identifier: dict[str, Any], accession_number: str) -> bool:
    codes = [coding.get("code") for coding in identifier.get("type", {}).get("coding", [])]
    return "ACSN" in codes and identifier.get("value") == accession_number


def _outcome(kind: OutcomeKind, code: int | None, key: str, message: str) -> Outcome:
    return Outcome(kind=kind, protocol=Protocol.FHIR, code=code, message=message, key=key)
