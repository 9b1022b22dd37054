"""The DICOM conformance statement (PS3.2 outline), generated from the running configuration.

Every list comes from the code that does the work (the listener's presentation contexts and
transfer syntaxes, the SR builder's codes, the pull module's query models) or from the site's
settings and database (AE title, ports, allow-list, destinations, poll sources), so the
statement cannot drift from what the installation actually does. Rendered as Markdown for the
command line and as HTML for `/conformance`.
"""

from __future__ import annotations

import html
import socket
from dataclasses import dataclass, field

import pynetdicom
from django.conf import settings
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from pydicom.uid import UID
from pynetdicom._globals import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.presentation import AllStoragePresentationContexts

from results.deliver.sr import (
    DEFAULT_CODES,
    SERIES_DESCRIPTION,
    SERIES_NUMBER,
    SOFTWARE_VERSION,
)
from results.models import Destination
from routing.models import ApplicationEntity, PollSource
from routing.pull.dimse import RETURN_KEYS
from routing.receive.listener import MAXIMUM_PDU_SIZE, TRANSFER_SYNTAXES

Row = list[str]


@dataclass
class Table:
    headers: Row
    rows: list[Row]

    @property
    def display_rows(self) -> list[Row]:
        return self.rows or [["(none configured)"] + [""] * (len(self.headers) - 1)]


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


@dataclass
class ConformanceStatement:
    title: str
    sections: list[Section]

    def as_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for number, section in enumerate(self.sections, 1):
            out += [f"## {number}. {section.title}", ""]
            for paragraph in section.paragraphs:
                out += [paragraph, ""]
            for table in section.tables:
                out.append("| " + " | ".join(table.headers) + " |")
                out.append("|" + "---|" * len(table.headers))
                out += [
                    "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table.display_rows
                ]
                out.append("")
        return "\n".join(out)

    def as_html(self) -> str:
        e = html.escape
        out = [
            "<!DOCTYPE html>",
            f'<html lang="en"><head><meta charset="utf-8"><title>{e(self.title)}</title>',
            "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.2em .5em;"
            "text-align:left;vertical-align:top}code{font-size:90%}</style></head><body>",
            f"<h1>{e(self.title)}</h1>",
        ]
        for number, section in enumerate(self.sections, 1):
            out.append(f"<h2>{number}. {e(section.title)}</h2>")
            out += [f"<p>{e(paragraph)}</p>" for paragraph in section.paragraphs]
            for table in section.tables:
                out.append(
                    "<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in table.headers) + "</tr></thead><tbody>"
                )
                out += ["<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>" for row in table.display_rows]
                out.append("</tbody></table>")
        out.append("</body></html>")
        return "\n".join(out)


def conformance_build() -> ConformanceStatement:
    return ConformanceStatement(
        title=f"PacsLens DICOM Conformance Statement — AE {settings.AE_TITLE}",
        sections=[
            _overview(),
            _network_summary(),
            _application_entity(),
            _association_policy(),
            _storage_scp(),
            _storage_scu(),
            _query_retrieve_scu(),
            _sr_template(),
            _dicomweb(),
            _security(),
            _character_sets(),
        ],
    )


# --- sections --------------------------------------------------------------------------------


def _overview() -> Section:

    return Section(
        "Overview",
        [
            "PacsLens receives studies from a PACS or modality, runs AI models on them and returns the result as a "
            "DICOM Structured Report (TID 1500) stored into the same study, and as HL7 v2 / FHIR messages to the RIS.",
            f"Generated {timezone.now():%Y-%m-%d %H:%M %Z} on {socket.gethostname()} from the running configuration.",
        ],
        [
            Table(
                ["Item", "Value"],
                [
                    ["Product", f"PacsLens {SOFTWARE_VERSION}"],
                    ["Implementation Class UID", pynetdicom.PYNETDICOM_IMPLEMENTATION_UID],
                    ["Implementation Version Name", pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION],
                    [
                        "DICOM toolkit",
                        f"PacsLens acceptor (listener); pynetdicom {pynetdicom.__version__} (association "
                        "negotiation, and every association PacsLens requests)",
                    ],
                ],
            )
        ],
    )


def _network_summary() -> Section:
    rows = [
        ["Verification", "1.2.840.10008.1.1", "Yes (assess, endpoint test)", "Yes"],
        ["Storage (all storage SOP classes, section 5)", "—", "SR results only (section 6)", "Yes"],
        ["Study Root Query/Retrieve — FIND", "1.2.840.10008.5.1.4.1.2.2.1", "Yes", "No"],
        ["Study Root Query/Retrieve — MOVE", "1.2.840.10008.5.1.4.1.2.2.2", "Yes", "No"],
        ["Study Root Query/Retrieve — GET", "1.2.840.10008.5.1.4.1.2.2.3", "Yes", "No"],
    ]
    return Section("Network services", tables=[Table(["SOP class", "UID", "SCU", "SCP"], rows)])


def _application_entity() -> Section:
    processes = settings.DICOM_LISTENER_PROCESSES
    rows = [
        ["AE title", settings.AE_TITLE],
        ["Listening address", f"{settings.DICOM_HOST}:{settings.DICOM_PORT} (TCP)"],
        ["Listener processes", f"{processes} (sharing one listening socket)"],
        [
            "Maximum concurrent associations",
            f"{settings.DICOM_MAX_ASSOCIATIONS} per process, {settings.DICOM_MAX_ASSOCIATIONS * processes} in all",
        ],
        ["Maximum PDU size received", f"{MAXIMUM_PDU_SIZE} bytes"],
        ["ARTIM / ACSE timeout", f"{settings.DICOM_ACSE_TIMEOUT:g} s"],
        ["Network (idle) timeout", f"{settings.DICOM_NETWORK_TIMEOUT:g} s"],
        [
            "Asynchronous operations",
            "Not supported (one outstanding operation per association; a proposed window is answered 1/1)",
        ],
        [
            "SCP/SCU role selection",
            "Answered: the requestor may be SCU only; a context proposing it as SCP only is rejected",
        ],
        ["DIMSE timeout", f"{settings.DICOM_DIMSE_TIMEOUT:g} s (a C-STORE data set that stops arriving is aborted)"],
    ]
    return Section(f"Application entity {settings.AE_TITLE}", tables=[Table(["Item", "Value"], rows)])


def _association_policy() -> Section:
    senders = ApplicationEntity.objects.filter(enabled=True, may_send=True).order_by("ae_title")
    if settings.DICOM_ACCEPT_ANY_CALLING_AE:
        calling = "Any calling AE title is accepted (PACSLENS_ACCEPT_ANY_CALLING_AE: testing only)."
    else:
        calling = "Only calling AE titles on the allow-list below are accepted; others are rejected."
    rows = [[ae.ae_title, ae.host or "—", "yes" if ae.check_peer_ip else "no", ae.description] for ae in senders]
    rejections = Table(
        ["Situation", "A-ASSOCIATE-RJ (result, source, reason)"],
        [
            ["Called AE title is not our AE title", "1 permanent, 1 service user, 7 called AE title not recognised"],
            [
                "Calling AE title not on the allow-list (or wrong peer address)",
                "1 permanent, 1 service user, 3 calling AE title not recognised",
            ],
            ["Free disk space below the floor", "2 transient, 3 service provider, 1 temporary congestion"],
            ["Too many associations in this process", "2 transient, 3 service provider, 2 local limit exceeded"],
        ],
    )
    return Section(
        "Association acceptance policy",
        [
            calling,
            "PacsLens never initiates associations to a sender in answer to a push; it proposes associations "
            "only as an SCU (results, query/retrieve, verification).",
        ],
        [rejections, Table(["Allowed calling AE title", "Host", "Peer address checked", "Description"], rows)],
    )


def _storage_scp() -> Section:

    classes = [[_name(cx.abstract_syntax), str(cx.abstract_syntax)] for cx in AllStoragePresentationContexts]
    syntaxes = [[_name(uid), uid] for uid in TRANSFER_SYNTAXES]
    statuses = Table(
        ["Situation", "C-STORE status"],
        [
            ["Stored durably (fsynced, recorded)", "0x0000 Success"],
            ["Same SOP Instance UID again", "0x0000 Success, stored once"],
            ["Dataset cannot be parsed", "0xC000 Error: cannot understand"],
            ["SOP Class/Instance UID in the dataset differ from the request, or invalid UID", "0xA900 Error"],
            ["Free disk space below the floor", "0xA700 Refused: out of resources"],
        ],
    )
    return Section(
        "Storage SCP and Verification SCP",
        [
            "Each SOP class below is accepted with each transfer syntax listed, in the SCP role. The instance is stored "
            "exactly as received (no decompression, no coercion of elements: level 2 storage, all elements kept), "
            "under a file name PacsLens chooses, and answered only after it is on disk and recorded.",
            "A study is complete when the associations that delivered it were released and nothing arrived for "
            f"{settings.STUDY_RELEASE_GRACE:g} s, or after a quiet period of {settings.STUDY_QUIET_PERIOD} s, or at the "
            f"latest {settings.STUDY_FORCE_COMPLETE_AFTER} s after its first instance.",
            "Received pixel data is deleted "
            f"{settings.RETENTION_DAYS:g} days after all results of the study were delivered (PACSLENS_RETENTION_DAYS).",
        ],
        [statuses, Table(["Transfer syntax", "UID"], syntaxes), Table(["Storage SOP class", "UID"], classes)],
    )


def _storage_scu() -> Section:
    destinations = Destination.objects.filter(kind="dicom", enabled=True).select_related("application_entity")
    rows = [
        [
            d.name,
            d.application_entity.ae_title,
            f"{d.application_entity.host}:{d.application_entity.port}",
            "yes" if d.application_entity.tls else "no",
        ]
        for d in destinations
        if d.application_entity
    ]
    return Section(
        "Storage SCU (results)",
        [
            "SOP class proposed: Comprehensive 3D SR Storage (1.2.840.10008.5.1.4.1.1.88.34), with transfer syntaxes "
            "Explicit VR Little Endian (1.2.840.10008.1.2.1) and Implicit VR Little Endian (1.2.840.10008.1.2).",
            "Status handling: 0x0000 and warnings (0xB000, 0xB006, 0xB007) are success; 0xA7xx is retried with "
            "exponential backoff; 0xA9xx, 0xCxxx and 0x0122 fail the delivery (failure queue); 0x0124 is a "
            "configuration error. A rejected association is not retried in a loop. Re-sends use the same SOP Instance UID.",
        ],
        [Table(["Destination", "AE title", "Address", "TLS"], rows)],
    )


def _query_retrieve_scu() -> Section:
    sources = PollSource.objects.filter(enabled=True, kind="dimse").select_related("pacs")
    rows = [
        [s.name, s.pacs.ae_title if s.pacs else "—", s.retrieve_mode, s.move_destination or settings.AE_TITLE]
        for s in sources
    ]
    return Section(
        "Query/Retrieve SCU (pull ingestion)",
        [
            "Study Root C-FIND at STUDY level with matching keys StudyDate (range) and ModalitiesInStudy and return "
            f"keys StudyInstanceUID, {', '.join(RETURN_KEYS)}. No patient-level keys are sent or requested.",
            f"C-MOVE at STUDY level with move destination {settings.AE_TITLE} (our Storage SCP, section 5); or C-GET "
            "at STUDY level, proposing the storage SOP classes in the SCP role (SCP/SCU role selection) on the same "
            "association.",
            "Transfer syntaxes proposed for the query/retrieve models: "
            + ", ".join(f"{_name(uid)} ({uid})" for uid in DEFAULT_TRANSFER_SYNTAXES)
            + ".",
        ],
        [Table(["Poll source", "PACS AE title", "Retrieve", "Move destination"], rows)],
    )


def _sr_template() -> Section:
    codes = DEFAULT_CODES
    rows = [
        ["Document root", "TID 1500 Measurement Report", '(126000, DCM, "Imaging Measurement Report")'],
        ["Observation context", "TID 1001/1004 device observer", "model name and version as manufacturer model name"],
        [
            "Procedure reported",
            "TID 1500",
            "("
            + ", ".join(
                [
                    codes.procedure_reported.value,
                    codes.procedure_reported.scheme_designator,
                    f'"{codes.procedure_reported.meaning}"',
                ]
            )
            + ")",
        ],
        ["Image library", "TID 1600", "every evaluated image of the series, by SOP Class/Instance UID"],
        ["Measurement group", "TID 1501", "tracking identifier and UID per result"],
        [
            "Triage score",
            "TID 300 numeric measurement",
            f'({codes.score_code}, {codes.scheme_designator}, "{codes.score_meaning}"), unit {codes.score_unit.value} (UCUM)',
        ],
        [
            "Finding flag",
            "TID 1501 qualitative evaluation",
            f'({codes.flag_code}, {codes.scheme_designator}, "{codes.flag_meaning}"): present / absent',
        ],
        [
            "Private coding scheme",
            "Coding Scheme Identification Sequence",
            f'{codes.scheme_designator} "{codes.scheme_name}" ({codes.scheme_organization})',
        ],
    ]
    return Section(
        "Structured Report produced",
        [
            f"One Comprehensive 3D SR per result, in the source study (same Study Instance UID and Patient/Study modules), "
            f'series number {SERIES_NUMBER}, series description "{SERIES_DESCRIPTION}". Completion flag COMPLETE, '
            "verification flag UNVERIFIED (no human signed it). Its SOP Instance UID derives from the result, so a "
            "re-send stores the same object again instead of a second copy.",
        ],
        [Table(["Content", "Template", "Coded concept / value"], rows)],
    )


def _dicomweb() -> Section:
    paragraphs = []
    try:
        paragraphs.append(
            f"STOW-RS origin server: POST {reverse('dicomweb:stow')} (bearer token per sender); the same "
            "checks and statuses as the Storage SCP, reported per instance."
        )
    except NoReverseMatch:
        pass
    paragraphs.append(
        "STOW-RS user agent: result SRs to DICOMweb destinations (application/dicom, multipart/related), "
        "reading the per-instance Referenced/Failed SOP Sequences."
    )
    paragraphs.append("QIDO-RS and WADO-RS user agent: pull ingestion from DICOMweb poll sources (study level).")
    return Section("DICOMweb", paragraphs)


def _security() -> Section:
    tls_peers = list(ApplicationEntity.objects.filter(enabled=True, tls=True).values_list("ae_title", flat=True))
    mode = settings.DICOM_TLS_MODE
    if mode != "off":
        ports = (
            f"port {settings.DICOM_PORT}"
            if mode == "tls"
            else (f"port {settings.DICOM_TLS_PORT}, plain TCP on port {settings.DICOM_PORT}")
        )
        client_certs = (
            "client certificates signed by a trusted CA are required"
            if settings.DICOM_TLS_REQUIRE_CLIENT_CERT
            else "client certificates are optional"
        )
        listener = f"The listener accepts DICOM TLS (BCP 195 profile: TLS 1.2 or later) on {ports}; {client_certs}."
    else:
        listener = (
            "The listener accepts plain TCP only in this configuration (no DICOM TLS configured); "
            "protect the link by network segmentation or a VPN."
        )
    return Section(
        "Security profiles",
        [
            listener,
            "Outbound TLS is used per remote AE title: "
            + (", ".join(tls_peers) if tls_peers else "none configured")
            + ".",
            "Association-level access control: called AE title check and calling AE title allow-list (section 4). "
            "Patient names, IDs and birth dates are never written to logs, task queues or error messages.",
        ],
    )


def _character_sets() -> Section:
    return Section(
        "Character sets",
        [
            "Storage SCP: any Specific Character Set (0008,0005) is accepted and stored unchanged; PacsLens decodes "
            "Patient/Study attributes with the declared character set for display only and never converts the stored "
            "objects. The default repertoire (ISO-IR 6) applies when the element is absent.",
            "SR produced: copies the Specific Character Set of the source study; PacsLens' own coded content is ASCII.",
            "Query identifiers sent: UIDs, dates, modality codes only (default repertoire).",
            "HL7 v2 and FHIR messages to the RIS are UTF-8.",
        ],
    )


# --- helpers ---------------------------------------------------------------------------------


def _name(uid: str | None) -> str:
    return UID(str(uid)).name
