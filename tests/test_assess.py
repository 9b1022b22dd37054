"""manage.py assess against real peers: the session Orthanc (DIMSE + DICOMweb), pynetdicom SCPs,
an MLLP listener and a FHIR server answering /metadata. Nothing may be stored in any of them."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pacslens.ops.assess import UnknownNode, node_assess
from results.models import Destination
from routing.models import ApplicationEntity
from tests.support.net import free_port

pytestmark = [pytest.mark.django_db, pytest.mark.interop]

OUR_AE = "PACSLENS"


@pytest.fixture
def pacs(orthanc, settings):
    settings.AE_TITLE = OUR_AE
    orthanc.clear()
    return ApplicationEntity.objects.create(
        ae_title=orthanc.aet, host=orthanc.host, port=orthanc.dicom_port, may_query=True, may_send=True
    )


class MetadataServer:
    """A FHIR server that answers GET /metadata only (anything else: 405), with a chosen statement."""

    def __init__(self, capability: dict[str, Any]) -> None:
        self.capability = capability
        self.methods: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.methods.append("GET")
                ok = self.path.endswith("/metadata")
                body = json.dumps(server.capability if ok else {}).encode()
                self.send_response(200 if ok else 405)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"


def capability(*resources: tuple[str, list[str]]) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "fhirVersion": "4.0.1",
        "software": {"name": "test RIS"},
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {"type": kind, "interaction": [{"code": code} for code in codes]} for kind, codes in resources
                ],
            }
        ],
    }


@pytest.fixture
def fhir() -> Iterator[MetadataServer]:
    server = MetadataServer(
        capability(("Observation", ["create", "search-type"]), ("ImagingStudy", ["update", "search-type", "read"]))
    )
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def probe(report, name):
    [found] = [p for p in report.probes if p.name == name]
    return found


def pattern(report, prefix):
    [found] = [p for p in report.ingestion + report.results if p.name.startswith(prefix)]
    return found


class TestAgainstOrthanc:
    def test_a_pacs_that_knows_us_supports_query_retrieve_and_sr(self, pacs, orthanc):
        orthanc.add_modality("pacslens", OUR_AE, "127.0.0.1", free_port())
        report = node_assess(node=orthanc.aet, dicomweb_url=orthanc.dicomweb_url, timeout=5)
        for name in (
            "C-ECHO",
            "C-FIND STUDY level",
            "C-FIND SERIES level",
            "C-FIND IMAGE level",
            "C-GET",
            "Storage SCP negotiation",
            "QIDO-RS",
            "WADO-RS",
        ):
            assert probe(report, name).ok is True, probe(report, name)
        # Orthanc looks the study up once it accepted the destination: accepted, not confirmed.
        move = probe(report, f"C-MOVE to {OUR_AE}")
        assert move.ok is None and "request accepted" in move.summary
        assert any(
            "Comprehensive 3D SR Storage: all proposed" in d for d in probe(report, "Storage SCP negotiation").details
        )
        assert pattern(report, "2b.").usable is True
        assert pattern(report, "3.").usable is True
        assert pattern(report, "SR write-back by C-STORE").usable is True
        assert orthanc.instance_count() == 0  # nothing stored

    def test_a_pacs_that_does_not_know_our_ae_is_reported_with_what_to_configure(self, pacs, orthanc, settings):
        settings.AE_TITLE = "UNKNOWN_TO_IT"
        report = node_assess(node=orthanc.aet, timeout=5)
        assert probe(report, "C-ECHO").ok is True
        assert probe(report, "C-MOVE to UNKNOWN_TO_IT").ok is False
        assert pattern(report, "2a.").usable is False
        assert any(
            "register UNKNOWN_TO_IT" in action and "C-MOVE destination" in action for action in report.it_actions
        )
        text = report.as_text()
        assert "What the site's IT team must configure" in text
        assert "What is the expected latency from acquisition to worklist update?" in text

    def test_it_resolves_a_dicomweb_destination_by_name(self, pacs, orthanc):
        Destination.objects.create(name="orthanc-web", kind="dicomweb", base_url=orthanc.dicomweb_url)
        report = node_assess(node="orthanc-web", timeout=5)
        assert [p.name for p in report.probes] == ["QIDO-RS", "WADO-RS", "STOW-RS"]
        assert probe(report, "STOW-RS").ok is None  # Orthanc does not answer OPTIONS: unknown without a write
        assert orthanc.instance_count() == 0


class TestAgainstPynetdicomPeers:
    def test_a_verification_only_scp_fails_every_other_service(self, db):
        port = free_port()
        ae = AE(ae_title="ECHOONLY")
        ae.add_supported_context(Verification)
        server = ae.start_server(("127.0.0.1", port), block=False)
        try:
            ApplicationEntity.objects.create(ae_title="ECHOONLY", host="127.0.0.1", port=port, may_send=False)
            report = node_assess(node="ECHOONLY", timeout=5)
        finally:
            server.shutdown()
        assert probe(report, "C-ECHO").ok is True
        assert probe(report, "Storage SCP negotiation").ok is False
        assert probe(report, "C-GET").ok is False
        assert pattern(report, "1.").usable is False  # not on our allow-list
        assert any("allow-list" in action for action in report.it_actions)
        assert any("Comprehensive 3D SR" in action for action in report.it_actions)

    def test_a_peer_that_rejects_our_calling_ae_is_said_once(self, db):
        port = free_port()
        ae = AE(ae_title="STRICT")
        ae.add_supported_context(Verification)
        ae.require_calling_aet = ["SOMEONE_ELSE"]
        server = ae.start_server(("127.0.0.1", port), block=False)
        try:
            ApplicationEntity.objects.create(ae_title="STRICT", host="127.0.0.1", port=port)
            report = node_assess(node="STRICT", timeout=5)
        finally:
            server.shutdown()
        assert [p.name for p in report.probes] == ["C-ECHO"]
        assert "calling AE title not recognised" in report.probes[0].summary
        assert any("known AE list" in action for action in report.it_actions)

    def test_nobody_listening(self, db):
        ApplicationEntity.objects.create(ae_title="GONE", host="127.0.0.1", port=free_port())
        report = node_assess(node="GONE", timeout=3)
        assert probe(report, "C-ECHO").ok is False
        assert any("Network: open TCP" in action for action in report.it_actions)


class TestRISEndpoints:
    def test_hl7_destination_connects_without_sending(self, db, mllp):
        Destination.objects.create(name="ris", kind="hl7", host="127.0.0.1", port=mllp.port, hl7_message_type="ORU^R01")
        report = node_assess(node="ris", timeout=3)
        assert probe(report, "MLLP connect").ok is True
        assert pattern(report, "HL7 v2").usable is True
        assert mllp.received == []  # connected, sent nothing

    def test_dead_mllp_port(self, db):
        Destination.objects.create(
            name="ris", kind="hl7", host="127.0.0.1", port=free_port(), hl7_message_type="ORU^R01"
        )
        report = node_assess(node="ris", timeout=3)
        assert probe(report, "MLLP connect").ok is False
        assert any("MLLP inbound port" in action for action in report.it_actions)

    def test_fhir_metadata(self, db, fhir):
        Destination.objects.create(name="fhir-ris", kind="fhir", base_url=fhir.url, auth="bearer", secret="t0ken")
        report = node_assess(node="fhir-ris", timeout=3)
        found = probe(report, "FHIR metadata")
        assert found.ok is True, found
        assert "FHIR 4.0.1, software test RIS" in found.details
        assert fhir.methods == ["GET"]
        assert "t0ken" not in report.as_text()

    def test_fhir_server_missing_interactions_is_not_confirmed(self, db, fhir):
        fhir.capability = capability(("Patient", ["read"]))
        Destination.objects.create(name="fhir-ris", kind="fhir", base_url=fhir.url)
        report = node_assess(node="fhir-ris", timeout=3)
        assert probe(report, "FHIR metadata").ok is None
        assert any("Observation create" in action for action in report.it_actions)


class TestCommand:
    def test_unknown_node(self, db):
        with pytest.raises(UnknownNode):
            node_assess(node="NOPE")
        with pytest.raises(CommandError, match="neither an AE title"):
            call_command("assess", "NOPE")

    def test_json_output(self, db, mllp):
        Destination.objects.create(name="ris", kind="hl7", host="127.0.0.1", port=mllp.port, hl7_message_type="ORU^R01")
        out = StringIO()
        call_command("assess", "ris", "--json", "--timeout", "3", stdout=out)
        data = json.loads(out.getvalue())
        assert data["probes"][0]["name"] == "MLLP connect" and data["probes"][0]["ok"] is True
        assert {a["question"] for a in data["answers"]} >= {"How are processing failures surfaced and retried?"}
