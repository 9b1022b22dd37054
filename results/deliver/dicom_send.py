"""C-STORE SCU: send result SRs to a PACS and classify what happened.

`send_datasets(...)` opens one association, stores every dataset and returns one `Outcome` per
dataset, in order. `StoreSession` is the same as a context manager for callers that keep an
association open while more work is queued for a destination (the benchmark target is an SR
C-STORE on an open association at p50 <= 10 ms).

Classification follows standards-notes: A-ASSOCIATE-RJ rejected-permanent is a configuration
error (calling/called AE not recognised) or permanent, rejected-transient and provider
congestion are transient; connection refused and timeouts are transient; DIMSE 0xA7xx is
transient, 0xA9xx / 0xCxxx / 0x0122 permanent, 0x0124 a configuration error, warnings
(0xB000, 0x0107, 0x0116, ...) are successes with a note.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from types import TracebackType

from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, Association, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.status import code_to_category

from results.deliver.payload import Outcome, OutcomeKind, Protocol
from routing.receive.dicom_tls import handshake_problem

DEFAULT_TIMEOUT_S = 10.0


def send_datasets(
    ae_title_calling: str,
    host: str,
    port: int,
    called_ae: str,
    datasets: Sequence[Dataset],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    tls: tuple[ssl.SSLContext, str] | None = None,
) -> list[Outcome]:
    """Store `datasets` over one association; one Outcome per dataset, same order."""
    if not datasets:
        return []
    sop_classes = sorted({str(ds.SOPClassUID) for ds in datasets})
    session = StoreSession(
        calling_ae_title=ae_title_calling,
        host=host,
        port=port,
        called_ae_title=called_ae,
        sop_class_uids=sop_classes,
        timeout=timeout,
        tls=tls,
    )
    failure = session.open()
    if failure is not None:
        return [_for_dataset(failure, ds) for ds in datasets]
    try:
        return [session.store(ds) for ds in datasets]
    finally:
        session.close()


class StoreSession:
    """One association to one destination, reusable for many C-STOREs.

    `open()` returns None when the association is up, or the Outcome explaining why not;
    entering the context manager raises `AssociationFailed` carrying that Outcome instead.
    `store()` re-opens the association when the peer has dropped it since the last store,
    so a session can be kept in a pool while work is queued for the destination.
    """

    def __init__(
        self,
        *,
        calling_ae_title: str,
        host: str,
        port: int,
        called_ae_title: str,
        sop_class_uids: Sequence[str] = (Comprehensive3DSRStorage,),
        timeout: float = DEFAULT_TIMEOUT_S,
        tls: tuple[ssl.SSLContext, str] | None = None,
    ) -> None:
        self.calling_ae_title = calling_ae_title
        self.host = host
        self.port = port
        self.called_ae_title = called_ae_title
        self.sop_class_uids = tuple(sop_class_uids)
        self.timeout = timeout
        self.tls = tls
        self._assoc: Association | None = None
        self._message_id = 0

    @property
    def peer(self) -> str:
        return f"{self.called_ae_title}@{self.host}:{self.port}"

    @property
    def is_open(self) -> bool:
        return self._assoc is not None and self._assoc.is_established

    def open(self) -> Outcome | None:
        ae = AE(ae_title=self.calling_ae_title)
        for timeout_name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, timeout_name, self.timeout)
        for sop_class in self.sop_class_uids:
            # Two contexts rather than one with two transfer syntaxes: offered both in one,
            # an SCP may pick implicit VR, and converting our explicit VR SR costs 35-250 ms
            # of pydicom encoding per store; with both accepted pynetdicom sends the SR's
            # raw explicit VR bytes as they are. Implicit stays for SCPs that know no other.
            ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
            ae.add_requested_context(sop_class, ImplicitVRLittleEndian)
        connected: list[bool] = []
        handlers: list[EventHandlerType] = [(evt.EVT_CONN_OPEN, _on_connection_open, [connected])]
        try:
            assoc = ae.associate(
                self.host,
                self.port,
                ae_title=self.called_ae_title,
                tls_args=self.tls,
                evt_handlers=handlers,
            )
        except (OSError, ValueError) as exc:
            # ValueError: pynetdicom rejects an invalid AE title or address up front.
            kind = OutcomeKind.CONFIG_ERROR if isinstance(exc, ValueError) else OutcomeKind.TRANSIENT
            return _outcome(kind, None, f"cannot associate with {self.peer}: {exc}")
        if assoc.is_established:
            self._assoc = assoc
            return None
        return self._association_failure(assoc, connected=bool(connected))

    def store(self, dataset: Dataset) -> Outcome:
        """C-STORE one dataset, re-opening the association if the peer dropped it meanwhile.

        Pooled associations go stale (the peer's idle timeout, a PACS restart); that should
        cost a reconnect, not a transient failure and a backoff cycle in the ledger.
        """
        key = str(dataset.SOPInstanceUID)
        if not self.is_open:
            self.close()
            failure = self.open()
            if failure is not None:
                return _for_dataset(failure, dataset)
        outcome = self._store_once(dataset, key)
        if outcome is None:
            # The socket failed before a response: reconnect once. Harmless even if the
            # peer did store it, because the SOP Instance UID is deterministic.
            self.close()
            failure = self.open()
            if failure is not None:
                return _for_dataset(failure, dataset)
            outcome = self._store_once(dataset, key)
        return outcome or _outcome(OutcomeKind.TRANSIENT, None, f"C-STORE to {self.peer} failed twice", key)

    def _store_once(self, dataset: Dataset, key: str) -> Outcome | None:
        """The Outcome of one C-STORE, or None if the connection broke while sending."""
        assert self._assoc is not None
        if not any(cx.abstract_syntax == dataset.SOPClassUID for cx in self._assoc.accepted_contexts):
            return _outcome(
                OutcomeKind.PERMANENT,
                None,
                f"{self.peer} did not accept SOP class {dataset.SOPClassUID}",
                key,
            )
        self._message_id = self._message_id % 65535 + 1
        try:
            status = self._assoc.send_c_store(dataset, msg_id=self._message_id)
        except (OSError, RuntimeError):
            return None
        if "Status" not in status:
            # No response: DIMSE timeout, abort or a dropped connection after sending. Not
            # retried here, since a slow peer would make us wait twice; the ledger retries.
            return _outcome(OutcomeKind.TRANSIENT, None, f"no C-STORE response from {self.peer}", key)
        return classify_store_status(
            int(status.Status), peer=self.peer, key=key, comment=str(status.get("ErrorComment", ""))
        )

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        self._assoc = None

    def __enter__(self) -> StoreSession:
        failure = self.open()
        if failure is not None:
            raise AssociationFailed(failure)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _association_failure(self, assoc: Association, *, connected: bool) -> Outcome:
        if assoc.is_rejected:
            rsp = assoc.acceptor.primitive
            if rsp is not None:
                result, source, diagnostic = rsp.result, rsp.result_source, rsp.diagnostic
                # An A-ASSOCIATE-RJ carries all three.
                assert result is not None and source is not None and diagnostic is not None
                return classify_rejection(
                    int(result),
                    int(source),
                    int(diagnostic),
                    peer=self.peer,
                    description=f"{rsp.result_str}, {rsp.source_str}: {rsp.reason_str}",
                )
            return _outcome(OutcomeKind.PERMANENT, None, f"{self.peer} rejected the association")
        if not connected and self.tls:
            problem = handshake_problem(self.tls, self.host, self.port, self.timeout)
            if problem:
                return _outcome(
                    OutcomeKind.CONFIG_ERROR,
                    None,
                    f"TLS handshake with {self.peer} failed ({problem}): check that PACSLENS_DICOM_TLS_CA holds the CA "
                    "that signed its certificate, and that it trusts ours",
                )
        if not connected:
            return _outcome(OutcomeKind.TRANSIENT, None, f"cannot connect to {self.peer}")
        if assoc.is_aborted and not assoc.accepted_contexts and assoc.rejected_contexts:
            return _outcome(
                OutcomeKind.PERMANENT,
                None,
                f"{self.peer} accepted none of SOP classes {', '.join(self.sop_class_uids)}",
            )
        return _outcome(
            OutcomeKind.TRANSIENT,
            None,
            f"association with {self.peer} aborted or timed out before acceptance",
        )


class AssociationFailed(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.describe())
        self.outcome = outcome


# A-ASSOCIATE-RJ (PS3.8 9.3.4): source 1 service-user, 2 ACSE provider, 3 presentation provider.
_USER_CONFIG_REASONS = {3: "calling AE title not recognised", 7: "called AE title not recognised"}


def classify_rejection(result: int, source: int, reason: int, *, peer: str, description: str = "") -> Outcome:
    code = f"A-ASSOCIATE-RJ {result}/{source}/{reason}"
    text = f"{peer} rejected the association{' (' + description + ')' if description else ''}"
    # Provider congestion / local limit exceeded (e.g. too many associations) passes soon,
    # whatever result the peer chose to put beside it.
    if result == 2 or source == 3:
        return _outcome(OutcomeKind.TRANSIENT, code, text)
    if source == 1 and reason in _USER_CONFIG_REASONS:
        return _outcome(
            OutcomeKind.CONFIG_ERROR,
            code,
            f"{text}: {_USER_CONFIG_REASONS[reason]}; fix the AE titles of the destination "
            "or register PacsLens at the PACS",
        )
    return _outcome(OutcomeKind.PERMANENT, code, text)


def classify_store_status(status: int, *, peer: str, key: str = "", comment: str = "") -> Outcome:
    """Map a C-STORE response status to an Outcome (standards-notes, PS3.4 B.2.3)."""
    note = f" ({comment})" if comment else ""
    if status == 0x0000:
        return _outcome(OutcomeKind.SUCCESS, status, f"stored at {peer}", key)
    if code_to_category(status) == "Warning" or 0xB000 <= status <= 0xBFFF:
        return Outcome(
            kind=OutcomeKind.SUCCESS,
            protocol=Protocol.DICOM,
            code=status,
            message=f"stored at {peer} with a warning",
            key=key,
            warning=f"status 0x{status:04X}{note}",
        )
    text = f"{peer} refused the object{note}"
    if 0xA700 <= status <= 0xA7FF:
        return _outcome(OutcomeKind.TRANSIENT, status, f"{text}: out of resources", key)
    if status == 0x0110:
        # Processing failure: the peer's generic "something broke"; retrying is cheap and the
        # ledger's attempt limit turns a persistent one into a failure.
        return _outcome(OutcomeKind.TRANSIENT, status, f"{text}: processing failure", key)
    if status == 0x0124:
        return _outcome(OutcomeKind.CONFIG_ERROR, status, f"{text}: not authorised", key)
    if 0xA900 <= status <= 0xA9FF:
        return _outcome(OutcomeKind.PERMANENT, status, f"{text}: dataset does not match SOP class", key)
    if 0xC000 <= status <= 0xCFFF:
        return _outcome(OutcomeKind.PERMANENT, status, f"{text}: cannot understand", key)
    if status == 0x0122:
        return _outcome(OutcomeKind.PERMANENT, status, f"{text}: SOP class not supported", key)
    return _outcome(OutcomeKind.PERMANENT, status, f"{text}: failure status", key)


def _on_connection_open(event: evt.Event, connected: list[bool]) -> None:
    # Runs right after connect(), before the A-ASSOCIATE-RQ goes out. Without TCP_NODELAY
    # Nagle's algorithm holds the small PDV/PDU writes back waiting for a delayed ACK: each
    # store to dcmtk or Orthanc took 48-96 ms instead of 4-6 ms.
    connected.append(True)
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _outcome(kind: OutcomeKind, code: int | str | None, message: str, key: str = "") -> Outcome:
    return Outcome(kind=kind, protocol=Protocol.DICOM, code=code, message=message, key=key)


def _for_dataset(outcome: Outcome, dataset: Dataset) -> Outcome:
    return Outcome(
        kind=outcome.kind,
        protocol=outcome.protocol,
        code=outcome.code,
        message=outcome.message,
        key=str(dataset.SOPInstanceUID),
    )
