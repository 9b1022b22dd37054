"""Integration assessment: probe a configured PACS or RIS and say which patterns this site can use.

`node_assess(node=...)` resolves NODE (an AE title, a destination name or a poll source name) to
its endpoints, runs the probes of pacslens/ops/probes/ (none stores anything), and returns an
AssessmentReport: each probe's answer, which ingestion and result patterns work, and what the
site's IT team must configure — the questions of the integration brief, answered for this site.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from pacslens.ops.probes import (
    DimseTarget,
    ProbeResult,
    probe_echo,
    probe_fhir,
    probe_find,
    probe_get,
    probe_mllp,
    probe_move,
    probe_qido,
    probe_storage,
    probe_stow,
    probe_wado,
)
from results.models import Delivery, DeliveryState, Destination
from routing.models import ApplicationEntity, PollSource

DEFAULT_TIMEOUT = 10.0


class UnknownNode(ValueError):
    pass


@dataclass
class Endpoints:
    """What NODE resolved to. Secrets stay here and never reach the report."""

    description: list[str] = field(default_factory=list)
    dimse: DimseTarget | None = None
    may_send: bool | None = None  # our allow-list: may this AE store to us?
    dicomweb_url: str = ""
    dicomweb_headers: dict = field(default_factory=dict, repr=False)
    dicomweb_auth: tuple[str, str] | None = field(default=None, repr=False)
    fhir_url: str = ""
    fhir_token: str = field(default="", repr=False)
    mllp: tuple[str, int] | None = None


@dataclass
class Pattern:
    name: str
    usable: bool | None
    why: str


@dataclass
class AssessmentReport:
    node: str
    endpoints: list[str]
    probes: list[ProbeResult]
    ingestion: list[Pattern]
    results: list[Pattern]
    it_actions: list[str]
    answers: list[tuple[str, str]]

    def as_text(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "??  "}
        lines = [f"Integration assessment of {self.node}", ""] + [f"  {e}" for e in self.endpoints] + ["", "Probes:"]
        for probe in self.probes:
            lines.append(f"  [{mark[probe.ok]}] {probe.name}: {probe.summary}")
            lines += [f"           {detail}" for detail in probe.details]
        for title, patterns in (("Ingestion patterns", self.ingestion), ("Result patterns", self.results)):
            lines += ["", f"{title}:"]
            for pattern in patterns:
                verdict = {True: "usable", False: "not usable", None: "not confirmed"}[pattern.usable]
                lines.append(f"  - {pattern.name}: {verdict} — {pattern.why}")
        lines += ["", "What the site's IT team must configure:"] + [f"  - {a}" for a in self.it_actions or ["nothing"]]
        for question, answer in self.answers:
            lines += ["", f"Q: {question}", f"A: {answer}"]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "node": self.node,
            "endpoints": self.endpoints,
            "probes": [p.as_dict() for p in self.probes],
            "ingestion": [vars(p) for p in self.ingestion],
            "results": [vars(p) for p in self.results],
            "it_actions": self.it_actions,
            "answers": [{"question": q, "answer": a} for q, a in self.answers],
        }


def node_assess(
    *,
    node: str,
    timeout: float = DEFAULT_TIMEOUT,
    dicomweb_url: str = "",
    fhir_url: str = "",
    mllp: tuple[str, int] | None = None,
) -> AssessmentReport:
    """Probe NODE (AE title, destination or poll source name) plus any extra endpoints given."""
    endpoints = node_endpoints(node)
    endpoints.dicomweb_url = dicomweb_url or endpoints.dicomweb_url
    endpoints.fhir_url = fhir_url or endpoints.fhir_url
    endpoints.mllp = mllp or endpoints.mllp
    probes = _run_probes(endpoints, timeout=timeout)
    by_name = {p.name: p for p in probes}
    ingestion, results = _patterns(endpoints, by_name)
    return AssessmentReport(
        node=node,
        endpoints=_endpoint_lines(endpoints),
        probes=probes,
        ingestion=ingestion,
        results=results,
        it_actions=_it_actions(endpoints, by_name),
        answers=_answers(),
    )


def node_endpoints(node: str) -> Endpoints:
    found = Endpoints()
    ae = ApplicationEntity.objects.filter(ae_title=node.strip()).first()
    destination = Destination.objects.filter(name=node).select_related("application_entity").first()
    source = PollSource.objects.filter(name=node).select_related("pacs").first()
    if destination is not None:
        found.description.append(f"destination {destination.name} ({destination.get_kind_display()})")
        ae = ae or destination.application_entity
        if destination.kind == "dicomweb":
            _dicomweb_from_destination(found, destination)
        elif destination.kind == "fhir":
            found.fhir_url = destination.base_url
            found.fhir_token = destination.secret if destination.auth == "bearer" else ""
        elif destination.kind == "hl7" and destination.host and destination.port:
            found.mllp = (destination.host, destination.port)
    if source is not None:
        found.description.append(f"poll source {source.name} ({source.get_kind_display()})")
        ae = ae or source.pacs
        if source.dicomweb_url and not found.dicomweb_url:
            found.dicomweb_url = source.dicomweb_url
    if ae is not None:
        found.description.insert(0, f"AE title {ae.ae_title}")
        found.may_send = ae.enabled and ae.may_send
        if ae.host and ae.port:
            found.dimse = DimseTarget(ae.ae_title, ae.host, ae.port, ae.tls)
    if not found.description:
        raise UnknownNode(
            f"{node!r} is neither an AE title, a destination nor a poll source (manage.py export_config lists them)"
        )
    return found


def _dicomweb_from_destination(found: Endpoints, destination) -> None:
    found.dicomweb_url = destination.base_url
    if destination.auth == "bearer":
        found.dicomweb_headers = {"Authorization": f"Bearer {destination.secret}"}
    elif destination.auth == "basic":
        found.dicomweb_auth = (destination.username, destination.secret)


def _run_probes(endpoints: Endpoints, *, timeout: float) -> list[ProbeResult]:
    probes: list[ProbeResult] = []
    target = endpoints.dimse
    if target is not None:
        echo = probe_echo(target, timeout=timeout)
        probes.append(echo)
        if echo.ok or "rejected" not in echo.summary:  # a rejection repeats for every service: say it once
            probes += probe_find(target, timeout=timeout)
            probes.append(probe_move(target, timeout=timeout, move_destination=settings.AE_TITLE))
            probes.append(probe_get(target, timeout=timeout))
            probes.append(probe_storage(target, timeout=timeout))
    if endpoints.dicomweb_url:
        kwargs: dict[str, Any] = dict(headers=endpoints.dicomweb_headers, auth=endpoints.dicomweb_auth, timeout=timeout)
        probes += [
            probe_qido(endpoints.dicomweb_url, **kwargs),
            probe_wado(endpoints.dicomweb_url, **kwargs),
            probe_stow(endpoints.dicomweb_url, **kwargs),
        ]
    if endpoints.fhir_url:
        probes.append(probe_fhir(endpoints.fhir_url, token=endpoints.fhir_token, timeout=timeout))
    if endpoints.mllp:
        probes.append(probe_mllp(*endpoints.mllp, timeout=timeout))
    return probes


def _patterns(endpoints: Endpoints, probes: dict[str, ProbeResult]) -> tuple[list[Pattern], list[Pattern]]:
    def ok(name: str) -> bool | None:
        probe = probes.get(name)
        return None if probe is None else probe.ok

    ae = settings.AE_TITLE
    move = ok(f"C-MOVE to {ae}")
    ingestion = []
    if endpoints.dimse:
        push_why = f"the PACS auto-forwards new studies to {ae}; " + (
            "its AE title is on our allow-list" if endpoints.may_send else "its AE title is NOT yet on our allow-list"
        )
        if move:
            push_why += f", and it already knows {ae} as a destination"
        # Whether the PACS will forward to us cannot be probed; its knowing us for C-MOVE is the best evidence.
        push = (True if move else None) if endpoints.may_send else False
        ingestion.append(Pattern("1. C-STORE push", push, push_why))
        find = ok("C-FIND STUDY level")
        ingestion.append(
            Pattern(
                "2a. Query/retrieve: C-FIND + C-MOVE",
                _all(find, move),
                "C-FIND at study level, then C-MOVE of each new study to our listener",
            )
        )
        ingestion.append(
            Pattern(
                "2b. Query/retrieve: C-FIND + C-GET",
                _all(find, ok("C-GET")),
                "C-FIND at study level, then C-GET on the same association (no inbound connection)",
            )
        )
    if endpoints.dicomweb_url:
        ingestion.append(
            Pattern(
                "3. DICOMweb: QIDO-RS + WADO-RS",
                _all(ok("QIDO-RS"), ok("WADO-RS")),
                "poll QIDO-RS for new studies, retrieve with WADO-RS",
            )
        )
    results = []
    if endpoints.dimse:
        results.append(
            Pattern(
                "SR write-back by C-STORE", ok("Storage SCP negotiation"), "Comprehensive 3D SR stored into the study"
            )
        )
    if endpoints.dicomweb_url:
        results.append(Pattern("SR write-back by STOW-RS", ok("STOW-RS"), "the same SR over HTTP"))
    if endpoints.mllp:
        results.append(
            Pattern(
                "HL7 v2 over MLLP (ORU^R01 / ORM^O01)",
                ok("MLLP connect"),
                "the RIS re-ranks the worklist; ACK handling per destination",
            )
        )
    if endpoints.fhir_url:
        results.append(
            Pattern(
                "FHIR R4 (Observation + ImagingStudy)", ok("FHIR metadata"), "conditional create/update, bearer token"
            )
        )
    return ingestion, results


def _it_actions(endpoints: Endpoints, probes: dict[str, ProbeResult]) -> list[str]:
    ae, port = settings.AE_TITLE, settings.DICOM_PORT
    actions = []
    target = endpoints.dimse
    failed = {name for name, probe in probes.items() if probe.ok is False}
    if target and "C-ECHO" in failed:
        summary = probes["C-ECHO"].summary
        if "rejected" in summary:
            actions.append(
                f"PACS: add AE title {ae} (this host, port {port}) to the known AE list and allow it to "
                "query, retrieve and store"
            )
        else:
            actions.append(
                f"Network: open TCP {target.host}:{target.port} from this host (firewall, routing), "
                "and check the PACS's AE title and port"
            )
    if target and endpoints.may_send is False:
        actions.append(f"PacsLens: put {target.ae_title} on the calling-AE allow-list ('may send') so it can push")
    if target:
        actions.append(
            f"PACS: auto-forward rule sending new studies of the chosen modalities to {ae} at this host, "
            f"port {port} (pattern 1)"
        )
    if f"C-MOVE to {ae}" in failed:
        actions.append(f"PACS: register {ae} (this host, port {port}) as a C-MOVE destination (pattern 2a)")
    if "Storage SCP negotiation" in failed and "C-ECHO" not in failed:
        actions.append(
            "PACS: accept Comprehensive 3D SR Storage (1.2.840.10008.5.1.4.1.1.88.34) from "
            f"{ae}, or use STOW-RS for results"
        )
    if {"QIDO-RS", "WADO-RS", "STOW-RS"} & failed:
        actions.append("PACS vendor: enable DICOMweb (QIDO-RS/WADO-RS/STOW-RS) and issue credentials for PacsLens")
    if "FHIR metadata" in failed or (probes.get("FHIR metadata") and probes["FHIR metadata"].ok is None):
        actions.append("RIS/FHIR server: grant Observation create and ImagingStudy update/search to PacsLens' token")
    if "MLLP connect" in failed and endpoints.mllp:
        host, mllp_port = endpoints.mllp
        actions.append(
            f"RIS interface engine: open the MLLP inbound port {host}:{mllp_port} to this host and route "
            "ORU^R01 / ORM^O01 to the worklist"
        )
    if target and target.tls is False:
        actions.append("Decide whether DICOM TLS is required on this link; if so, exchange certificates")
    return actions


def _answers() -> list[tuple[str, str]]:
    return [
        (
            "Which DICOM services does PacsLens act as SCU vs SCP?",
            f"SCP: Verification and Storage (AE {settings.AE_TITLE}, port {settings.DICOM_PORT}) for pushed or "
            "C-MOVEd studies; STOW-RS origin server. SCU: Storage of the result SR, Study Root C-FIND/C-MOVE/C-GET for "
            "pull, QIDO-RS/WADO-RS/STOW-RS, HL7 v2 MLLP client, FHIR client. `manage.py conformance_statement` has details.",
        ),
        (
            "What does the hospital IT team configure, and what does PacsLens handle?",
            "IT: the items listed above (AE entries, forwarding rule, firewall, DICOMweb/FHIR credentials, MLLP route). "
            "PacsLens: study completion, routing, inference, result building, retries, failure queue, retention.",
        ),
        (
            "How are processing failures surfaced and retried?",
            "Every delivery is retried with exponential backoff per destination; a circuit breaker isolates a dead "
            "peer; what cannot be delivered lands in the failure queue (UI and `manage.py deliver`), and /metrics "
            "exposes it for the sample alerts in docs/operations.md.",
        ),
        ("What is the expected latency from acquisition to worklist update?", _latency_answer()),
    ]


def _latency_answer() -> str:
    rows = Delivery.objects.filter(kind__in=["hl7", "fhir"], state=DeliveryState.DELIVERED, delivered_at__isnull=False)
    seconds = sorted(
        (d - r).total_seconds()
        for d, r in rows.order_by("-delivered_at").values_list("delivered_at", "study__last_received_at")[:1000]
        if d is not None  # always: the query excludes undelivered rows
    )
    base = (
        f"After the last instance arrives: study completion ({settings.STUDY_RELEASE_GRACE:g} s after a normal "
        f"release, at most {settings.STUDY_QUIET_PERIOD} s quiet period), then inference and delivery."
    )
    if not seconds:
        return base + " No worklist update has been delivered on this site yet; `make bench` measures it."
    p50, p95 = seconds[len(seconds) // 2], seconds[min(len(seconds) - 1, int(len(seconds) * 0.95))]
    return base + f" Measured here over the last {len(seconds)} worklist updates: median {p50:.1f} s, p95 {p95:.1f} s."


def _endpoint_lines(endpoints: Endpoints) -> list[str]:
    lines = list(endpoints.description)
    if endpoints.dimse:
        lines.append(f"DIMSE: {endpoints.dimse} (calling AE {settings.AE_TITLE})")
    if endpoints.dicomweb_url:
        lines.append(f"DICOMweb: {endpoints.dicomweb_url}")
    if endpoints.fhir_url:
        lines.append(f"FHIR: {endpoints.fhir_url}")
    if endpoints.mllp:
        lines.append(f"MLLP: {endpoints.mllp[0]}:{endpoints.mllp[1]}")
    return lines


def _all(*values: bool | None) -> bool | None:
    if any(v is False for v in values):
        return False
    return True if all(v is True for v in values) else None
