"""DIMSE pull: C-FIND at STUDY level, then C-MOVE (to our listener) or C-GET (into the ingest path).

Identifiers are built from non-patient keys only (study UID, date/time, modalities, counts), and
pynetdicom's identifier logging stays off, so nothing here can put patient data in a log line,
a Poll row or an error message. Errors carry the DIMSE status they came from.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, cast

from django.conf import settings
from django.db import connection
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # pynetdicom creates its SOP classes at run time
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from routing.models import ApplicationEntity, PollSource
from routing.pull.types import (
    FoundStudy,
    PullError,
    RetrieveOutcome,
    parse_study_datetime,
)
from routing.receive import dicom_tls
from routing.receive.listener import TRANSFER_SYNTAXES
from routing.store.spool import incoming_dir, instance_store

if TYPE_CHECKING:
    from pynetdicom.pdu_primitives import _UI

logger = logging.getLogger(__name__)

MAX_MATCHES = 5000  # a query answering more than this is cancelled; narrow the look-back window
RETURN_KEYS = ["StudyDate", "StudyTime", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"]

# C-MOVE final statuses that retrying cannot fix: the PACS does not know the destination AE.
PERMANENT_MOVE_STATUSES = {0xA801, 0x0122, 0x0124}
STATUS_HINTS = {
    0xA701: "PACS out of resources: unable to calculate the number of matches",
    0xA702: "PACS out of resources: unable to perform the sub-operations",
    0xA801: "the PACS does not know the move destination AE title: add our AE (title, host, port) to the PACS",
    0xA900: "the PACS says the identifier does not match the SOP class",
    0xB000: "sub-operations completed with failures or warnings",
    0xFE00: "the PACS cancelled the retrieve",
    0x0122: "the PACS does not support this query/retrieve model",
    0x0124: "the PACS refused: not authorised",
}


def query_studies(
    source: PollSource, *, date_from: date, date_to: date | None, modalities: list[str]
) -> list[FoundStudy]:
    """C-FIND at STUDY level in the Study Root model. Raises PullError if the PACS cannot be asked."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    identifier.StudyDate = f"{date_from:%Y%m%d}-{date_to:%Y%m%d}" if date_to else f"{date_from:%Y%m%d}-"
    identifier.StudyTime = ""
    identifier.ModalitiesInStudy = "\\".join(modalities)
    identifier.NumberOfStudyRelatedInstances = ""
    for keyword, value in (source.extra_filters or {}).items():
        setattr(identifier, keyword, value)

    pacs = _pacs(source)
    assoc = _associate(source, [StudyRootQueryRetrieveInformationModelFind])
    found: list[FoundStudy] = []
    try:
        for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            code = _status_code(status)
            if code is None:
                raise PullError(
                    f"C-FIND to {pacs.ae_title}: no response (aborted or timed out); check that "
                    f"the PACS lists our AE title {settings.AE_TITLE} as allowed to query"
                )
            if code in (0xFF00, 0xFF01) and answer is not None:
                found.append(_found(answer))
                if len(found) > MAX_MATCHES:
                    raise PullError(
                        f"C-FIND to {pacs.ae_title}: more than {MAX_MATCHES} matches; "
                        "narrow the look-back window or the filters"
                    )
            elif code != 0x0000:
                raise PullError(f"C-FIND to {pacs.ae_title} failed: {_describe(code)}", status=code)
    finally:
        _close(assoc)
    # Matching on ModalitiesInStudy is optional for a PACS: check it ourselves too.
    if modalities:
        found = [f for f in found if not f.modalities or set(f.modalities) & set(modalities)]
    return found


def retrieve_study(source: PollSource, study_instance_uid: str, *, association_id: int | None) -> RetrieveOutcome:
    if source.retrieve_mode == PollSource.RetrieveMode.C_GET:
        return _c_get(source, study_instance_uid, association_id=association_id)
    return _c_move(source, study_instance_uid)


def _c_move(source: PollSource, study_instance_uid: str) -> RetrieveOutcome:
    destination = source.move_destination or settings.AE_TITLE
    assoc = _associate(source, [StudyRootQueryRetrieveInformationModelMove])
    try:
        last: tuple[int | None, Dataset | None] = (None, None)
        for status, _ in assoc.send_c_move(
            _retrieve_identifier(study_instance_uid), destination, StudyRootQueryRetrieveInformationModelMove
        ):
            last = (_status_code(status), status)
    finally:
        _close(assoc)
    return _outcome("C-MOVE", source, *last)


def _c_get(source: PollSource, study_instance_uid: str, *, association_id: int | None) -> RetrieveOutcome:
    receiver = _GetReceiver(source, association_id)
    handlers = [(evt.EVT_C_STORE, receiver.handle_store), (evt.EVT_CONN_CLOSE, receiver.handle_close)]
    contexts = [StudyRootQueryRetrieveInformationModelGet]
    # 128 presentation contexts at most per association: the query model plus the storage classes.
    storage = [cx.abstract_syntax for cx in StoragePresentationContexts if cx.abstract_syntax is not None]
    storage = storage[: 127 - len(contexts)]
    assoc = _associate(source, contexts, storage=storage, handlers=handlers)
    try:
        last: tuple[int | None, Dataset | None] = (None, None)
        for status, _ in assoc.send_c_get(
            _retrieve_identifier(study_instance_uid), StudyRootQueryRetrieveInformationModelGet
        ):
            last = (_status_code(status), status)
    finally:
        _close(assoc)
    outcome = _outcome("C-GET", source, *last)
    if receiver.refused and outcome.ok:
        # We refused some sub-operations ourselves (disk full, unreadable): not a complete retrieve.
        return RetrieveOutcome(
            ok=False,
            status=receiver.last_refusal,
            completed=outcome.completed,
            failed=receiver.refused,
            warning=outcome.warning,
            error=f"C-GET: we refused {receiver.refused} instance(s), last status 0x{receiver.last_refusal:04X}",
        )
    return outcome


class _GetReceiver:
    """C-STORE sub-operations of a C-GET arrive on our own association: hand them to ingest."""

    def __init__(self, source: PollSource, association_id: int | None) -> None:
        pacs = _pacs(source)
        self.calling_ae_title = pacs.ae_title
        self.sender_id = source.pacs_id if pacs.may_send else None
        self.association_id = association_id
        self.refused = 0
        self.last_refusal = 0

    def handle_store(self, event: evt.Event) -> int:
        temp_path = _temp_file(event)
        request = cast(C_STORE, event.request)  # EVT_C_STORE carries the C-STORE request
        result = instance_store(
            temp_path=temp_path,
            request_sop_class_uid=str(request.AffectedSOPClassUID),
            request_sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_ae_title=self.calling_ae_title,
            called_ae_title=settings.AE_TITLE,
            association_id=self.association_id,
            sender_id=self.sender_id,
        )
        if not result.ok:
            self.refused += 1
            self.last_refusal = result.status
        return result.status

    def handle_close(self, event: evt.Event) -> None:
        connection.close()  # the store handler ran in the association's thread, with its own connection


def _temp_file(event: evt.Event) -> Path:
    chunked = getattr(event.request, "_dataset_path", None)
    target = incoming_dir() / f"get-{uuid.uuid4().hex}.part"
    if chunked:  # pynetdicom already streamed it to a file (a listener in this process set that mode)
        shutil.move(str(chunked), target)
        return target
    with target.open("wb") as fh:
        fh.write(event.encoded_dataset())
    return target


def _retrieve_identifier(study_instance_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_instance_uid
    return identifier


def _outcome(service: str, source: PollSource, code: int | None, status: Dataset | None) -> RetrieveOutcome:
    pacs = _pacs(source)
    if code is None or status is None:
        return RetrieveOutcome(
            ok=False,
            status=None,
            error=f"{service} from {pacs.ae_title}: no final response (association aborted or timed out)",
        )
    completed = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
    failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
    warning = int(status.get("NumberOfWarningSuboperations", 0) or 0)
    if code == 0x0000 and failed == 0:
        return RetrieveOutcome(ok=True, status=code, completed=completed, failed=failed, warning=warning)
    error = (
        f"{service} from {pacs.ae_title}: {_describe(code)} (completed {completed}, failed {failed}, warning {warning})"
    )
    if failed and code in (0xB000, 0xA702, 0xC000):
        error += "; if every sub-operation failed, check that the PACS may store to us (AE allow-list)"
    elif service == "C-MOVE" and not completed and not failed:
        error += (
            f"; check that the PACS knows the move destination {source.move_destination or settings.AE_TITLE} "
            "and that our listener accepted its stores (listener log)"
        )
    return RetrieveOutcome(
        ok=False,
        status=code,
        completed=completed,
        failed=failed,
        warning=warning,
        error=error,
        permanent=code in PERMANENT_MOVE_STATUSES,
    )


def _associate(source: PollSource, models: list, *, storage: Sequence[str] | None = None, handlers=None):
    pacs = _pacs(source)
    if not pacs.host or not pacs.port:
        raise PullError(f"{pacs.ae_title} has no host/port configured")
    # Identifiers (patient names and IDs) must never reach our logs.
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    ae = AE(ae_title=settings.AE_TITLE)
    ae.acse_timeout = settings.DICOM_ACSE_TIMEOUT
    ae.dimse_timeout = settings.DICOM_DIMSE_TIMEOUT
    ae.network_timeout = settings.DICOM_NETWORK_TIMEOUT
    ae.connection_timeout = settings.DICOM_ACSE_TIMEOUT
    for model in models:
        ae.add_requested_context(model)
    roles: list[_UI] = []
    for sop_class in storage or []:
        ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
        roles.append(build_role(sop_class, scp_role=True))
    tls_args = dicom_tls.client_tls_args(tls=pacs.tls, host=pacs.host)
    assoc = ae.associate(
        pacs.host,
        pacs.port,
        ae_title=pacs.ae_title,
        ext_neg=roles or None,
        evt_handlers=handlers or [],
        tls_args=tls_args,
    )
    if assoc.is_established:
        return assoc
    where = f"{pacs.ae_title} at {pacs.host}:{pacs.port}"
    if assoc.is_rejected:
        raise PullError(
            f"association rejected by {where}: check that it knows our AE title "
            f"{settings.AE_TITLE} and allows it to query",
            permanent=True,
        )
    raise PullError(f"cannot reach {where}: connection refused, aborted or timed out")


def _pacs(source: PollSource) -> ApplicationEntity:
    """The PACS a DIMSE source talks to: PollSource.clean() requires one for the DIMSE kind."""
    assert source.pacs is not None
    return source.pacs


def _close(assoc) -> None:
    if assoc.is_established:
        assoc.release()


def _status_code(status: Dataset | None) -> int | None:
    if status is None or "Status" not in status:
        return None
    return int(status.Status)


def _describe(code: int) -> str:
    hint = STATUS_HINTS.get(code) or STATUS_HINTS.get(code & 0xFF00)
    return f"status 0x{code:04X}" + (f" ({hint})" if hint else "")


def _found(answer: Dataset) -> FoundStudy:
    count = answer.get("NumberOfStudyRelatedInstances")
    modalities = answer.get("ModalitiesInStudy") or []
    if isinstance(modalities, str):
        modalities = [modalities]
    return FoundStudy(
        study_instance_uid=str(answer.get("StudyInstanceUID", "")).strip(),
        study_datetime=parse_study_datetime(str(answer.get("StudyDate", "")), str(answer.get("StudyTime", ""))),
        instances=int(count) if count not in (None, "") else None,
        modalities=[str(m).upper() for m in modalities if m],
    )
