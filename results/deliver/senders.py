"""Send one result payload to a destination with the protocol client the destination needs.

Builders raise *BuildError (a ValueError) when a payload cannot be made valid: permanent for
that result. Associations to a DICOM destination stay open in the RunContext while the worker
keeps finding work for it (an SR C-STORE on an open association costs milliseconds; opening
one costs far more).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import requests
from django.conf import settings
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
)

from results.deliver.coding import fhir_settings, hl7_message_type, hl7_settings, sr_codes
from results.deliver.dicom_send import StoreSession
from results.deliver.fhir import FHIRBuildError, send_fhir_result
from results.deliver.hl7 import (
    AckPolicy,
    HL7BuildError,
    build_hl7_message,
    send_mllp,
)
from results.deliver.payload import Outcome, OutcomeKind, Protocol, ResultPayload
from results.deliver.sr import SRBuildError, build_sr
from results.deliver.stow_client import stow_datasets
from results.deliver.summary import SummaryBuildError, build_key_objects, build_summary_image
from results.models import Destination
from routing.models.sealed import SECRET_UNREADABLE
from routing.oauth import OAuthBearer, OAuthClient, PeerSession, TokenError, tls_verify
from routing.receive import dicom_tls

BuildError = (SRBuildError, HL7BuildError, FHIRBuildError, SummaryBuildError)


def send(
    *,
    destination: Destination,
    payload: ResultPayload,
    key: str | tuple[str, str],
    context,
    coding: dict[str, Any] | None = None,
) -> Outcome:
    """Send `payload` to `destination` under its idempotency `key`: the SR's SOP Instance UID,
    the HL7 MSH-10 control id, or for FHIR the Observation identifier (system, value).
    `coding` is the delivery's coding profile snapshot (Delivery.coding; {}: the defaults)."""
    coding = coding or {}
    if destination.kind not in ("dicomweb", "fhir"):
        return _send(destination, payload, key, context, coding, None)
    key_value = str(key[1] if isinstance(key, tuple) else key)
    unreadable = destination.oauth_secret_unreadable if destination.auth == "oauth2" else destination.secret_unreadable
    if destination.auth != "none" and unreadable:
        return Outcome(OutcomeKind.CONFIG_ERROR, Protocol(destination.kind), None, SECRET_UNREADABLE, key_value)
    try:
        with http_session(destination) as session:
            return _send(destination, payload, key, context, coding, session)
    except TokenError as exc:
        return Outcome(OutcomeKind.TOKEN_ERROR, Protocol(destination.kind), exc.code, str(exc), key_value)


def http_session(destination: Destination) -> requests.Session:
    """A session for a DICOMweb or FHIR destination: its authentication and its CA bundle.
    Its requests raise TokenError when an OAuth token cannot be had."""
    session = PeerSession(tls_verify(destination))
    if destination.auth == "oauth2":
        session.auth = OAuthBearer(OAuthClient.of(destination))
    elif destination.auth == "basic":
        session.auth = (destination.username, destination.secret)
    elif destination.auth == "bearer":
        session.headers["Authorization"] = f"Bearer {destination.secret}"
    return session


def _send(
    destination: Destination,
    payload: ResultPayload,
    key: str | tuple[str, str],
    context,
    coding: dict[str, Any],
    session: requests.Session | None,
) -> Outcome:
    """`session`: a DICOMweb or FHIR destination's (http_session), None for the other kinds."""
    if destination.kind in ("dicom", "dicomweb"):
        # The summary image and KOS go with the SR in this one delivery (one ledger row, one
        # retry schedule); their UIDs derive from the result like the SR's.
        summary = build_summary_image(payload) if destination.send_summary_image else None
        # Key images only for a flagged result: a KOS on a negative study would point at nothing.
        kos = build_key_objects(payload, summary) if destination.send_key_objects and payload.finding_flag else None
        sr = build_sr(payload, summary=summary, sr_codes=sr_codes(coding))
        if sr.SOPInstanceUID != key:
            # Keys are minted once; an SR under another UID would be a second copy at the PACS.
            return Outcome(
                OutcomeKind.PERMANENT,
                Protocol(destination.kind),
                None,
                f"the SR built for this result has SOP Instance UID {sr.SOPInstanceUID}, not the delivery's {key}",
                str(key),
            )
        # The SR last: when it is stored, everything it references is.
        datasets = [ds for ds in (summary, kos) if ds is not None] + [sr]
        if destination.kind == "dicom":
            outcomes: list[Outcome] = []
            for ds in datasets:
                outcomes.append(_send_dicom(destination, ds, context))
                if not outcomes[-1].ok:
                    break  # the next attempt sends them all again, under the same UIDs
        else:
            outcomes = stow_datasets(
                destination.base_url,
                datasets,
                timeout=destination.timeout_seconds,
                session=session,
                verify=tls_verify(destination),
            )
        return outcome_combined(outcomes, total=len(datasets))
    if destination.kind == "hl7":
        assert isinstance(key, str)
        message = build_hl7_message(
            payload,
            message_type=hl7_message_type(destination, coding),
            control_id=key,
            settings=hl7_settings(destination, coding),
        )
        return send_mllp(
            destination.host,
            cast(int, destination.port),  # Destination.clean requires a port for HL7
            message,
            control_id=key,
            policy=ack_policy(destination),
            ack_timeout=destination.timeout_seconds,
        )
    if destination.kind == "fhir":
        assert isinstance(key, tuple)
        return send_fhir_result(
            destination.base_url,
            payload,
            settings=fhir_settings(coding),
            timeout=destination.timeout_seconds,
            identifier=key,
            session=session,
        )
    raise ValueError(f"unknown destination kind {destination.kind!r}")


def outcome_combined(outcomes: list[Outcome], *, total: int) -> Outcome:
    """One outcome for the objects of one delivery (the SR's last): the SR's when all
    succeeded, else the failure retrying can help least (configuration, permanent, transient)."""
    failures = [o for o in outcomes if not o.ok]
    if not failures:
        warnings = "; ".join(o.warning for o in outcomes if o.warning)
        return replace(outcomes[-1], warning=warnings)
    order = (OutcomeKind.CONFIG_ERROR, OutcomeKind.PERMANENT, OutcomeKind.TOKEN_ERROR, OutcomeKind.TRANSIENT)
    worst = min(failures, key=lambda o: order.index(o.kind))
    if total > 1:
        stored = len(outcomes) - len(failures)
        worst = replace(worst, message=f"{worst.message} ({stored} of {total} objects stored)")
    return worst


def sop_classes(destination: Destination) -> list[UID]:
    """What a DICOM destination's association must offer: the SR, and the objects sent beside it."""
    return (
        [Comprehensive3DSRStorage]
        + ([SecondaryCaptureImageStorage] if destination.send_summary_image else [])
        + ([KeyObjectSelectionDocumentStorage] if destination.send_key_objects else [])
    )


def _send_dicom(destination: Destination, dataset, context) -> Outcome:
    session = context.sessions.get(destination.pk)
    if session is None or not session.is_open:
        ae = destination.application_entity
        assert ae is not None  # Destination.clean requires an AE title for DICOM destinations
        session = StoreSession(
            calling_ae_title=settings.AE_TITLE,
            host=ae.host,
            port=cast(int, ae.port),  # Destination.clean requires the AE to have a port
            called_ae_title=ae.ae_title,
            sop_class_uids=sop_classes(destination),
            timeout=destination.timeout_seconds,
            tls=dicom_tls.client_tls_args(tls=ae.tls, host=ae.host),
        )
        failure = session.open()
        if failure is not None:
            return failure
        context.sessions[destination.pk] = session
    return session.store(dataset)


def ack_policy(destination: Destination) -> AckPolicy:
    def kind(action: str) -> OutcomeKind:
        return OutcomeKind.TRANSIENT if action == "retry" else OutcomeKind.PERMANENT

    return AckPolicy(on_error=kind(destination.on_ack_error), on_reject=kind(destination.on_ack_reject))
