"""The DICOM listener: C-ECHO and C-STORE SCP on our own acceptor (routing.receive.scp).

It does the least work possible per instance (verify, write durably, record, answer); the
handlers here are thin and `routing.store.spool.instance_store` does the work. Study completion
and everything after run in the workers.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import close_old_connections, connection, transaction
from django.utils import timezone
from pydicom import config as pydicom_config
from pynetdicom.presentation import AllStoragePresentationContexts

from routing.models import ApplicationEntity, StoreAssociation
from routing.receive import dicom_tls
from routing.receive.scp import (
    AcceptorServer,
    AcceptorSettings,
    Association,
    AssociationSlots,
    StoreRequest,
    supported_contexts,
)
from routing.store.spool import OUT_OF_RESOURCES, disk_space_low, incoming_dir, instance_store
from routing.tasks import enqueue_completion_check

logger = logging.getLogger(__name__)

# Uncompressed and the common compressed syntaxes; stored exactly as received.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

# A-ASSOCIATE-RJ (result, source, reason) per PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CONGESTION = (0x02, 0x03, 0x01)

# C-STORE failure statuses the handlers answer themselves (PS3.7 C.4.2, PS3.4 B.2.3).
NOT_AUTHORIZED = 0x0124  # the sender is not (or no longer) on the allow-list

ALLOW_LIST_TTL = 5.0  # seconds an allow-list read from the database is reused

# Largest PDU we accept: bounded, though a PDU is never held whole (routing.receive.scp streams
# data set fragments to their file); dcmtk sends up to 128 KiB when allowed.
MAXIMUM_PDU_SIZE = 1024 * 1024


class DicomListener:
    """One listening AE on one or two ports. `start()` returns at once; `stop()` drains running associations.

    `tls_mode` (default PACSLENS_DICOM_TLS_MODE): "off", plain DICOM on `port`; "tls", TLS only
    on `port`; "both", plain on `port` and TLS on `tls_port`. `listening_sockets`, when given,
    are already bound and listening, one per port in that order (see scp.AcceptorServer).
    It is the `StoreHandler` of its servers: the association_* and store methods below.
    """

    def __init__(
        self,
        *,
        host: str | None = None,
        port: int | None = None,
        ae_title: str | None = None,
        tls_mode: str | None = None,
        tls_port: int | None = None,
        listening_sockets: list[socket.socket] | None = None,
    ) -> None:
        self.host = host if host is not None else settings.DICOM_HOST
        self.port = port if port is not None else settings.DICOM_PORT
        self.ae_title = ae_title or settings.AE_TITLE
        self.tls_mode = tls_mode or settings.DICOM_TLS_MODE
        self.tls_port: int | None = tls_port if tls_port is not None else settings.DICOM_TLS_PORT
        self.listening_sockets = listening_sockets
        self.server: AcceptorServer | None = None  # the server on `port`
        self.servers: list[AcceptorServer] = []
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self._allow_list: dict[str, ApplicationEntity] = {}
        self._allow_list_read_at = 0.0
        self._host_addresses: dict[str, frozenset[str]] = {}
        self._lock = threading.Lock()

    def endpoints(self) -> list[tuple[int, bool]]:
        """(port, uses TLS) for each port this listener serves."""
        return listener_endpoints(self.tls_mode, self.port, self.tls_port)

    def start(self) -> AcceptorServer:
        # Received headers are read with pydicom (routing.store.header): we check the values that
        # matter ourselves, so skip its validation of every other value (and its warnings).
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        acceptor = AcceptorSettings(
            ae_title=self.ae_title,
            maximum_pdu_size=MAXIMUM_PDU_SIZE,
            acse_timeout=settings.DICOM_ACSE_TIMEOUT,
            network_timeout=settings.DICOM_NETWORK_TIMEOUT,
            dimse_timeout=settings.DICOM_DIMSE_TIMEOUT,
            # Receive straight to a temporary file under the data dir: bounded memory for huge
            # instances, and the final rename stays on one filesystem.
            incoming_dir=incoming_dir,  # created now: a data dir we cannot write fails at start
            supported=supported_contexts(
                [str(context.abstract_syntax) for context in AllStoragePresentationContexts], TRANSFER_SYNTAXES
            ),
        )
        incoming_dir()
        slots = AssociationSlots(settings.DICOM_MAX_ASSOCIATIONS)
        tls_context = dicom_tls.server_context() if self.tls_mode != "off" else None
        for index, (port, uses_tls) in enumerate(self.endpoints()):
            server = AcceptorServer(
                (self.host, port),
                settings=acceptor,
                handler=self,
                shared=slots,
                ssl_context=tls_context if uses_tls else None,
                listening_socket=self.listening_sockets[index] if self.listening_sockets else None,
            )
            server.max_connections_per_peer = settings.DICOM_MAX_ASSOCIATIONS_PER_PEER
            server.max_connections = settings.DICOM_MAX_CONNECTIONS
            self.servers.append(server)
            name = "dicom-listener-tls" if uses_tls else "dicom-listener"
            threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
            logger.info(
                "DICOM listener %s on %s:%s%s (%s)",
                self.ae_title,
                self.host,
                server.server_address[1],
                " (TLS)" if uses_tls else "",
                self.identity,
            )
        self.server = self.servers[0]
        self.port = self.server.server_address[1]
        if self.tls_mode == "tls":
            self.tls_port = self.port
        elif self.tls_mode == "both":
            self.tls_port = self.servers[1].server_address[1]
        return self.server

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let running associations finish for up to `grace` seconds, then abort the rest."""
        if not self.servers:
            return
        grace = settings.DICOM_SHUTDOWN_GRACE if grace is None else grace
        servers, self.servers, self.server = self.servers, [], None
        for server in servers:
            server.shutdown()  # stops accepting new connections
            server.server_close()
        deadline = time.monotonic() + grace
        while any(server.active_associations for server in servers) and time.monotonic() < deadline:
            time.sleep(0.1)
        for server in servers:
            server.abort_all()

    # --- the StoreHandler: thin, the work lives in routing.store ------------------------------

    def association_requested(self, assoc: Association) -> tuple[tuple[int, int, int], str] | None:
        """(A-ASSOCIATE-RJ, why) for an association we refuse, None for one we accept."""
        if disk_space_low():
            return REJECT_CONGESTION, "free disk space below the floor"
        sender = self._allowed_sender(assoc.calling_ae_title, assoc.peer_address)
        if sender is None and not settings.DICOM_ACCEPT_ANY_CALLING_AE:
            return REJECT_CALLING_AE, "calling AE title not recognised"
        if sender is not None and not sender.certificate_accepted(
            dicom_tls.certificate_names(assoc.peer_certificate())
        ):
            return REJECT_CALLING_AE, "no client certificate carrying the name bound to this calling AE title"
        return None

    def store(self, assoc: Association, request: StoreRequest) -> tuple[int, str]:
        calling = assoc.calling_ae_title
        try:
            sender = self._allowed_sender(calling, assoc.peer_address)
            association_id = self._association_row(assoc)
        except Exception as exc:  # a locked or unreachable database: the sender should retry later
            logger.warning("refusing C-STORE from %s: database unavailable (%s)", calling, type(exc).__name__)
            request.path.unlink(missing_ok=True)
            return OUT_OF_RESOURCES, "Out of resources: the database is unavailable"
        if sender is None and not settings.DICOM_ACCEPT_ANY_CALLING_AE:
            # The allow-list changed since the association was accepted (or its check failed then).
            request.path.unlink(missing_ok=True)
            return NOT_AUTHORIZED, "Not authorized: the calling AE title is no longer allowed"
        result = instance_store(
            temp_path=request.path,
            request_sop_class_uid=request.sop_class_uid,
            request_sop_instance_uid=request.sop_instance_uid,
            transfer_syntax_uid=request.transfer_syntax_uid,
            calling_ae_title=calling,
            called_ae_title=assoc.called_ae_title,
            association_id=association_id,
            sender_id=sender.pk if sender else None,
        )
        return result.status, result.message

    def association_ended(self, assoc: Association) -> None:
        """Close the association's row and ask the workers to check its studies for completion."""
        association_id = assoc.state.pop("association_id", None)
        try:
            if association_id is None:
                return
            with transaction.atomic():
                StoreAssociation.objects.filter(pk=association_id, ended_at=None).update(
                    ended_at=timezone.now(),
                    released_normally=assoc.released,
                    instances_received=assoc.instances_received,
                )
                enqueue_completion_check(association_id)
        except Exception as exc:  # the sweep closes it later (routing.completion.associations_orphaned_close)
            logger.warning("cannot close association %s: %s", association_id, type(exc).__name__)
        finally:
            connection.close()  # each association runs in its own thread with its own connection

    # --- helpers -------------------------------------------------------------------------------

    def _association_row(self, assoc: Association) -> int:
        association_id = assoc.state.get("association_id")
        if association_id is None:
            close_old_connections()
            row = StoreAssociation.objects.create(
                calling_ae_title=assoc.calling_ae_title,
                called_ae_title=assoc.called_ae_title,
                peer_address=assoc.peer_address,
                listener=self.identity,
            )
            association_id = assoc.state["association_id"] = row.pk
        return association_id

    def _allowed_sender(self, calling: str, address: str) -> ApplicationEntity | None:
        with self._lock:
            if time.monotonic() - self._allow_list_read_at > ALLOW_LIST_TTL:
                close_old_connections()
                self._allow_list = {
                    ae.ae_title: ae for ae in ApplicationEntity.objects.filter(enabled=True, may_send=True)
                }
                self._host_addresses = {}  # names are looked up again with the list (DNS may have moved)
                self._allow_list_read_at = time.monotonic()
            sender = self._allow_list.get(calling)
            if sender and sender.check_peer_ip:
                # Every C-STORE asks again (the list may have changed); the name's addresses are
                # resolved once per list read, not once per instance.
                addresses = self._host_addresses.get(sender.host)
                if addresses is None:
                    addresses = self._host_addresses[sender.host] = _host_addresses(sender.host)
                if address not in addresses:
                    return None
        return sender

    def refresh_allow_list(self) -> None:
        self._allow_list_read_at = 0.0


def _host_addresses(configured: str) -> frozenset[str]:
    """The addresses a configured host name (or address) stands for; none when it does not resolve."""
    try:
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(configured, None))
    except OSError:
        return frozenset()


def listener_endpoints(tls_mode: str, port: int, tls_port: int | None) -> list[tuple[int, bool]]:
    """(port, uses TLS) per listening port for a PACSLENS_DICOM_TLS_MODE."""
    if tls_mode == "off":
        return [(port, False)]
    if tls_mode == "tls":
        return [(port, True)]
    if tls_mode == "both":
        if tls_port is None:
            raise ImproperlyConfigured("PACSLENS_DICOM_TLS_MODE=both needs PACSLENS_DICOM_TLS_PORT")
        return [(port, False), (tls_port, True)]
    raise ImproperlyConfigured(f"DICOM TLS mode {tls_mode!r} is not one of off, tls, both")
