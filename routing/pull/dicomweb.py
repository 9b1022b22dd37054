"""DICOMweb pull with dicomweb-client: QIDO-RS to find new studies, WADO-RS to retrieve them.

Every retrieved instance is written to a temp file under the incoming dir and goes through
`routing.store.spool.instance_store`, exactly like a C-STORE. Error messages name the HTTP status
and the host, never a response body (a PACS may echo patient data in it).
"""

from __future__ import annotations

import logging
import uuid
from datetime import date
from typing import Literal
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient
from django.conf import settings
from django.core.exceptions import ValidationError

from routing.models import PollSource
from routing.models.sealed import SECRET_UNREADABLE
from routing.oauth import OAuthBearer, OAuthClient, PeerSession, TokenError, tls_verify
from routing.pull.types import (
    FoundStudy,
    PullError,
    RetrieveOutcome,
    parse_study_datetime,
)
from routing.store.spool import incoming_dir, instance_store

logger = logging.getLogger(__name__)
# dicomweb-client logs request headers (our bearer token) at DEBUG: never let that through.
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

# DICOM JSON tags of the QIDO-RS return keys we read.
STUDY_INSTANCE_UID = "0020000D"
STUDY_DATE = "00080020"
STUDY_TIME = "00080030"
MODALITIES_IN_STUDY = "00080061"
NUMBER_OF_STUDY_RELATED_INSTANCES = "00201208"
QIDO_FIELDS = ["StudyDate", "StudyTime", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"]
QIDO_PAGE = 200
MAX_MATCHES = 5000
# Ask for the instances as the PACS holds them (no transcoding on either side).
WADO_MEDIA_TYPES = (("application/dicom", "*"),)
HTTP_TIMEOUT = (10.0, 120.0)  # connect, read


def query_studies(
    source: PollSource, *, date_from: date, date_to: date | None, modalities: list[str]
) -> list[FoundStudy]:
    filters: dict[str, str] = {
        "StudyDate": f"{date_from:%Y%m%d}-{date_to:%Y%m%d}" if date_to else f"{date_from:%Y%m%d}-"
    }
    if len(modalities) == 1:
        filters["ModalitiesInStudy"] = modalities[0]
    filters.update(source.extra_filters or {})
    client = _client(source)
    found: list[FoundStudy] = []
    offset = 0
    with _http_errors(source, "QIDO-RS"):
        while True:
            page = client.search_for_studies(search_filters=filters, fields=QIDO_FIELDS, limit=QIDO_PAGE, offset=offset)
            found.extend(_found(item) for item in page)
            if len(page) < QIDO_PAGE:
                break
            offset += len(page)
            if offset >= MAX_MATCHES:
                raise PullError(
                    f"QIDO-RS to {_host(source)}: more than {MAX_MATCHES} matches; "
                    "narrow the look-back window or the filters"
                )
    if modalities:
        found = [f for f in found if not f.modalities or set(f.modalities) & set(modalities)]
    return [f for f in found if f.study_instance_uid]


def retrieve_study(source: PollSource, study_instance_uid: str, *, association_id: int | None) -> RetrieveOutcome:
    """WADO-RS the whole study, streaming one instance at a time into the ingest path."""
    client = _client(source)
    completed = failed = 0
    last_refusal = None
    try:
        with _http_errors(source, "WADO-RS"):
            for dataset in client.iter_study(study_instance_uid, media_types=WADO_MEDIA_TYPES):
                temp_path = incoming_dir() / f"wado-{uuid.uuid4().hex}.part"
                dataset.save_as(temp_path, enforce_file_format=True)
                result = instance_store(
                    temp_path=temp_path,
                    request_sop_class_uid=str(dataset.get("SOPClassUID", "")),
                    request_sop_instance_uid=str(dataset.get("SOPInstanceUID", "")),
                    transfer_syntax_uid=str(dataset.file_meta.get("TransferSyntaxUID", "")),
                    calling_ae_title=source.label,
                    called_ae_title=settings.AE_TITLE,
                    association_id=association_id,
                    sender_id=None,
                )
                if result.ok:
                    completed += 1
                else:
                    failed += 1
                    last_refusal = result.status
    except PullError as exc:
        return RetrieveOutcome(
            ok=False,
            status=exc.status,
            completed=completed,
            failed=failed,
            error=f"{exc} after {completed} instance(s)",
            permanent=exc.permanent,
        )
    if failed:
        return RetrieveOutcome(
            ok=False,
            status=last_refusal,
            completed=completed,
            failed=failed,
            error=f"WADO-RS: we refused {failed} instance(s), last status 0x{last_refusal:04X}",
        )
    if completed == 0:
        return RetrieveOutcome(ok=False, status=None, error=f"WADO-RS from {_host(source)} returned no instances")
    return RetrieveOutcome(ok=True, status=200, completed=completed)


def dicomweb_session(source: PollSource) -> requests.Session:
    """A session with the source's authentication (OAuth client credentials, or the token from its
    environment variable) and its CA bundle. Raises PullError when the configuration is unusable."""
    session = PeerSession(tls_verify(source))
    if source.uses_oauth:
        if source.oauth_secret_unreadable:
            raise PullError(f"oauth_client_secret: {SECRET_UNREADABLE}", permanent=True)
        session.auth = OAuthBearer(OAuthClient.of(source))
    elif source.dicomweb_token_env:
        try:
            token = source.dicomweb_token()
        except ValidationError as exc:
            raise PullError(f"dicomweb_token_env: {exc.messages[0]}", permanent=True) from None
        if not token:
            raise PullError(
                f"environment variable {source.dicomweb_token_env} (the DICOMweb token) is not set", permanent=True
            )
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def _client(source: PollSource) -> DICOMwebClient:
    client = DICOMwebClient(url=source.dicomweb_url.rstrip("/"), session=dicomweb_session(source), timeout=HTTP_TIMEOUT)
    # Its retry loop also retries refused connections, for 30 s; our backoff is per source and retrieve.
    client.set_http_retry_params(retry=False)
    return client


class _http_errors:
    """Turn requests' exceptions into PullError with a patient-free message."""

    def __init__(self, source: PollSource, service: str) -> None:
        self.where = f"{service} to {_host(source)}"

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        if exc is None or isinstance(exc, PullError):
            return False
        if isinstance(exc, TokenError):
            # Not permanent: once the identity provider's side is fixed, the next try gets a token.
            raise PullError(
                f"{self.where}: token error: {exc}", status=exc.code if isinstance(exc.code, int) else None
            ) from None
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            code = exc.response.status_code
            hint = {401: "check the token", 403: "check the token's permissions", 404: "check the base URL"}.get(code)
            raise PullError(
                f"{self.where}: HTTP {code}" + (f" ({hint})" if hint else ""),
                status=code,
                permanent=code in (401, 403, 404),
            ) from None
        if isinstance(exc, requests.ConnectionError):
            raise PullError(f"cannot reach {self.where}: connection refused or reset") from None
        if isinstance(exc, requests.Timeout):
            raise PullError(f"{self.where}: timed out") from None
        if isinstance(exc, (requests.RequestException, ValueError)):
            raise PullError(f"{self.where}: unusable response ({type(exc).__name__})") from None
        return False


def _host(source: PollSource) -> str:
    return urlsplit(source.dicomweb_url).netloc or source.dicomweb_url


def _value(item: dict, tag: str) -> list:
    return (item.get(tag) or {}).get("Value") or []


def _found(item: dict) -> FoundStudy:
    uid = _value(item, STUDY_INSTANCE_UID)
    count = _value(item, NUMBER_OF_STUDY_RELATED_INSTANCES)
    study_date = _value(item, STUDY_DATE)
    study_time = _value(item, STUDY_TIME)
    return FoundStudy(
        study_instance_uid=str(uid[0]) if uid else "",
        study_datetime=parse_study_datetime(
            str(study_date[0]) if study_date else "", str(study_time[0]) if study_time else ""
        ),
        instances=int(count[0]) if count else None,
        modalities=[str(m).upper() for m in _value(item, MODALITIES_IN_STUDY)],
    )
