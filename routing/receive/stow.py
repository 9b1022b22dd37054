"""STOW-RS receive endpoint: `POST /dicomweb/studies[/{StudyInstanceUID}]`.

Each sending system has its own bearer token (StowSender, stored hashed). The endpoint accepts
that token and nothing else: no session, no cookie, so exempting it from CSRF opens no hole
(a browser never attaches a bearer token by itself). Every part goes through
`routing.store.spool.instance_store`, the same durable path as C-STORE; the answer is the standard
per-instance STOW-RS response (PS3.18 10.5): 200 all stored, 202 some, 409 none.

A request is recorded as one StoreAssociation, so study completion treats it like a C-STORE
association that was released when the response was sent.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.utils.http import parse_header_parameters
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from pydicom import dcmread

from pacslens.client_address import client_address
from routing.models import ApplicationEntity, StoreAssociation, StowSender
from routing.receive.multipart import BodyTooLarge, MultipartError, OutOfSpace, Part, iter_parts
from routing.receive.stow_response import StowItem, stow_response
from routing.store.spool import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    OUT_OF_RESOURCES,
    StoreResult,
    disk_space_low,
    incoming_dir,
    instance_store,
)
from routing.tasks import enqueue_completion_check

logger = logging.getLogger(__name__)

REALM = 'Bearer realm="PacsLens STOW-RS"'


@csrf_exempt
@require_POST
def stow_studies(request: HttpRequest, study_instance_uid: str | None = None) -> HttpResponse:
    sender = StowSender.authenticate(_bearer_token(request))
    if sender is None:
        return _unauthorized(request)
    entity, problem = _sender_entity(sender)
    if problem:
        return problem
    boundary, problem = _boundary(request)
    if problem:
        return problem
    stream, problem = _body_stream(request)
    if problem:
        return problem
    if disk_space_low():
        return _out_of_space()
    association = StoreAssociation.objects.create(
        calling_ae_title=sender.name,
        called_ae_title=settings.AE_TITLE,
        peer_address=client_address(request)[:64],
        listener="stow-rs",
    )
    items: list[StowItem] = []
    error: HttpResponse | None = None
    try:
        parts = iter_parts(
            stream,
            boundary=boundary,
            directory=incoming_dir(),
            max_bytes=settings.STOW_MAX_BYTES,
            space_low=disk_space_low,
        )
        for part in parts:
            items.append(
                _store_part(
                    part,
                    sender=sender,
                    sender_id=entity.pk if entity else None,
                    association_id=association.pk,
                    study_instance_uid=study_instance_uid,
                )
            )
    except BodyTooLarge:
        error = _plain(
            413, f"Request body larger than {settings.STOW_MAX_BYTES} bytes; send fewer instances per request"
        )
    except OutOfSpace:
        logger.warning(
            "STOW-RS request from %s stopped: free space under %s below the floor", sender, settings.DATA_DIR
        )
        if not items:
            error = _out_of_space()
        else:  # what was stored stays stored; the part being written is one failed part
            items.append(StowItem(status=OUT_OF_RESOURCES, message="Out of resources: free disk space is low"))
    except MultipartError as exc:
        if not items:
            error = _plain(400, f"Not a valid multipart/related body: {exc}")
        else:  # what was stored stays stored; the truncated remainder is one failed part
            items.append(StowItem(status=CANNOT_UNDERSTAND, message=str(exc)))
    finally:
        _association_end(association, stored=sum(1 for i in items if i.ok), released=error is None)
    if error is not None:
        return error
    if not items:
        return _plain(400, "The request holds no parts")
    return stow_response(items, accept=request.headers.get("Accept", ""))


def _store_part(
    part: Part, *, sender: StowSender, sender_id: int | None, association_id: int, study_instance_uid: str | None
) -> StowItem:
    try:
        if part.content_type not in ("application/dicom", ""):
            return StowItem(status=CANNOT_UNDERSTAND, message="part is not application/dicom")
        _ensure_preamble(part.path)
        meta = _part_header(part.path)
        if study_instance_uid and meta.get("study") and meta["study"] != study_instance_uid:
            return StowItem(
                status=DATASET_MISMATCH,
                sop_class_uid=meta["sop_class"],
                sop_instance_uid=meta["sop_instance"],
                message="Study Instance UID differs from the one in the request URL",
            )
        result: StoreResult = instance_store(
            temp_path=part.path,
            request_sop_class_uid=meta.get("sop_class", ""),
            request_sop_instance_uid=meta.get("sop_instance", ""),
            transfer_syntax_uid=meta.get("transfer_syntax", ""),
            calling_ae_title=sender.name,
            called_ae_title=settings.AE_TITLE,
            association_id=association_id,
            sender_id=sender_id,
        )
        return StowItem(
            status=result.status,
            sop_class_uid=meta.get("sop_class", ""),
            sop_instance_uid=meta.get("sop_instance", ""),
            message=result.message,
        )
    finally:
        part.path.unlink(missing_ok=True)


def _ensure_preamble(path: Path) -> None:
    """Give a part that starts straight with its file meta group the Part 10 preamble it lacks.

    pydicom's dcmwrite (used by dicomweb-client) omits the preamble for a dataset that was not
    read from a file; the content is otherwise a valid Part 10 file, so accept it.
    """
    with path.open("rb") as fh:
        head = fh.read(132)
    if head[128:132] == b"DICM" or not head.startswith(b"\x02\x00"):
        return
    fixed = path.with_suffix(".fixed")
    try:
        with path.open("rb") as src, fixed.open("wb") as dst:
            dst.write(b"\x00" * 128 + b"DICM")
            shutil.copyfileobj(src, dst, 1024 * 1024)
        os.replace(fixed, path)
    finally:
        fixed.unlink(missing_ok=True)  # left only when the copy failed (disk full)


def _part_header(path: Path) -> dict[str, str]:
    """What a C-STORE request would carry: SOP Class/Instance from the file meta, and the study UID.

    An unreadable part yields {}: instance_store then answers "cannot understand" (0xC000).
    """
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SOPClassUID", "SOPInstanceUID"])
        meta = ds.file_meta
        return {
            "sop_class": str(meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID", "")),
            "sop_instance": str(meta.get("MediaStorageSOPInstanceUID") or ds.get("SOPInstanceUID", "")),
            "transfer_syntax": str(meta.get("TransferSyntaxUID", "")),
            "study": str(ds.get("StudyInstanceUID", "")),
        }
    except Exception:  # pydicom raises many types on malformed input
        return {}


def _association_end(association: StoreAssociation, *, stored: int, released: bool) -> None:
    with transaction.atomic():
        StoreAssociation.objects.filter(pk=association.pk).update(
            ended_at=timezone.now(), released_normally=released, instances_received=stored
        )
        if stored:
            enqueue_completion_check(association.pk)


def _sender_entity(sender: StowSender) -> tuple[ApplicationEntity | None, HttpResponse | None]:
    """The sender's AE (linked, else by its AE title), or a 403 when that AE may not store to us.

    A token alone does not outrank the AE table: disabling an AE, or taking it off the calling-AE
    allow-list, stops its STOW-RS requests as it stops its associations.
    """
    entity = sender.application_entity or ApplicationEntity.objects.filter(ae_title=sender.name).first()
    if entity is None or (entity.enabled and entity.may_send):
        return entity, None
    reason = "is disabled" if not entity.enabled else "may not send (not on the calling-AE allow-list)"
    logger.info("STOW-RS request from sender %s refused: its AE %s", sender, reason)
    return entity, _plain(
        403, f"Sender {sender.name}: application entity {entity.ae_title} {reason}; ask staff to enable it"
    )


def _out_of_space() -> HttpResponse:
    response = _plain(503, "Out of resources: free disk space is below the configured floor; retry later")
    response["Retry-After"] = "300"
    return response


def _bearer_token(request: HttpRequest) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _unauthorized(request: HttpRequest) -> HttpResponse:
    response = _plain(401, "A valid bearer token for this sender is required (manage.py stow_token)")
    given = bool(request.headers.get("Authorization"))
    response["WWW-Authenticate"] = REALM + (', error="invalid_token"' if given else "")
    logger.info("STOW-RS request from %s refused: %s token", client_address(request), "invalid" if given else "no")
    return response


def _boundary(request: HttpRequest) -> tuple[str, HttpResponse | None]:
    media_type, params = parse_header_parameters(request.META.get("CONTENT_TYPE", ""))
    if media_type.lower() != "multipart/related":
        return "", _plain(415, 'Send multipart/related; type="application/dicom"')
    part_type = params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        return "", _plain(415, f'Only type="application/dicom" is accepted, not {part_type[:64]!r}')
    boundary = params.get("boundary", "")
    # RFC 2046 allows 70 characters; Orthanc sends 73, so be lenient but bounded.
    if not boundary or len(boundary) > 200:
        return "", _plain(400, "The multipart boundary parameter is missing or too long")
    # RFC 2046 boundaries are ASCII; an RFC 2231 `boundary*=utf-8''...` can decode to anything.
    if not boundary.isascii() or not boundary.isprintable():
        return "", _plain(400, "The multipart boundary must be printable ASCII (RFC 2046)")
    return boundary, None


def _body_stream(request: HttpRequest):
    length = request.META.get("CONTENT_LENGTH")
    if length:
        try:
            size = int(length)
        except ValueError:
            return None, _plain(400, "Content-Length is not a number")
        if size > settings.STOW_MAX_BYTES:
            return None, _plain(
                413, f"Request body larger than {settings.STOW_MAX_BYTES} bytes; send fewer instances per request"
            )
        return request, None
    if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
        # Django reads nothing without Content-Length; a server that de-chunks (gunicorn) hands
        # us the decoded body here. The byte limit is enforced while reading.
        return request.META["wsgi.input"], None
    return None, _plain(411, "Content-Length (or chunked transfer encoding) is required")


def _plain(status: int, message: str) -> HttpResponse:
    return JsonResponse({"error": message}, status=status)
