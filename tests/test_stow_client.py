"""STOW-RS client against Orthanc's DICOMweb plugin and a local HTTP server we script."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
from collections.abc import Callable, Iterator
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import pytest
from pydicom import dcmread

from results.deliver.payload import OutcomeKind, Protocol
from results.deliver.sr import build_sr
from results.deliver.stow_client import HttpAuth, stow_datasets
from tests.support.ct import make_ct_slices
from tests.support.dicom_files import part10_bytes
from tests.support.identities import identity
from tests.support.net import free_port
from tests.support.sr import assert_orthanc_holds_the_sr, make_payload

pytestmark = pytest.mark.interop


# --- Orthanc ---------------------------------------------------------------------------------


def test_it_stores_the_sr_in_the_source_study_at_orthanc(orthanc):
    sources = make_ct_slices(3)
    payload = make_payload(sources, identity=identity("result-stow-1"))
    orthanc.clear()
    for ds in sources:
        orthanc.upload(part10_bytes(ds))

    (outcome,) = stow_datasets(orthanc.dicomweb_url, [build_sr(payload)])

    assert outcome.kind is OutcomeKind.SUCCESS, outcome.describe()
    assert (outcome.protocol, outcome.code) == (Protocol.DICOMWEB, 200)
    assert outcome.key == payload.sr_sop_instance_uid
    assert_orthanc_holds_the_sr(orthanc, sources, payload)


def test_a_re_send_leaves_one_copy_at_orthanc(orthanc):
    sources = make_ct_slices(2)
    payload = make_payload(sources, identity=identity("result-stow-2"))
    orthanc.clear()
    for ds in sources:
        orthanc.upload(part10_bytes(ds))

    first = stow_datasets(orthanc.dicomweb_url, [build_sr(payload)])
    again = stow_datasets(orthanc.dicomweb_url, [build_sr(payload)])

    assert first[0].ok and again[0].ok, again[0].describe()
    assert len(orthanc.find_instances({"SOPInstanceUID": str(payload.sr_sop_instance_uid)})) == 1
    assert orthanc.instance_count() == len(sources) + 1


# --- A scripted STOW-RS server ------------------------------------------------------------------

Responder = Callable[[list[str]], tuple[int, Any]]


class StowServer:
    """Parses each multipart/related request into SOP Instance UIDs and answers via `respond`."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.respond: Responder = lambda uids: (200, stow_body(stored=uids))
        # While `hang` is set, requests get no answer until `release` is set at teardown.
        self.hang = threading.Event()
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                uids = parse_stow_request(self.headers["Content-Type"], body)
                server.requests.append({"path": self.path, "headers": dict(self.headers), "uids": uids})
                if server.hang.is_set():
                    server.release.wait(30)
                    return
                status, payload = server.respond(uids)
                raw = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicomweb"


def parse_stow_request(content_type: str, body: bytes) -> list[str]:
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    assert message.get_content_type() == "multipart/related"
    assert message.get_param("type") == "application/dicom"
    uids = []
    for part in message.iter_parts():
        assert part.get_content_type() == "application/dicom"
        uids.append(str(dcmread(io.BytesIO(part.get_payload(decode=True))).SOPInstanceUID))
    return uids


def stow_body(
    *, stored: list[str] = (), failed: dict[str, int] | None = None, warned: dict[str, int] | None = None
) -> dict[str, Any]:
    def item(uid: str, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.88.34"]},
            "00081155": {"vr": "UI", "Value": [uid]},
            **extra,
        }

    body: dict[str, Any] = {}
    if stored:
        body["00081199"] = {
            "vr": "SQ",
            "Value": [
                item(uid, {"00081196": {"vr": "US", "Value": [(warned or {})[uid]]}} if uid in (warned or {}) else {})
                for uid in stored
            ],
        }
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [item(uid, {"00081197": {"vr": "US", "Value": [reason]}}) for uid, reason in failed.items()],
        }
    return body


@pytest.fixture
def stow_server() -> Iterator[StowServer]:
    server = StowServer()
    yield server
    server.release.set()
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture(scope="module")
def three_srs():
    sources = make_ct_slices(1, patient_name="Doe^Jane")
    return [build_sr(make_payload(sources, identity=identity(f"result-s{n}"))) for n in range(3)]


def kinds(outcomes) -> list[OutcomeKind]:
    return [outcome.kind for outcome in outcomes]


def test_it_posts_one_multipart_request_to_studies(stow_server, three_srs):
    outcomes = stow_datasets(stow_server.url, three_srs)
    (request,) = stow_server.requests
    assert request["path"] == "/dicomweb/studies"
    assert request["uids"] == [str(sr.SOPInstanceUID) for sr in three_srs]
    assert request["headers"]["Accept"] == "application/dicom+json"
    assert "Authorization" not in request["headers"]
    assert kinds(outcomes) == [OutcomeKind.SUCCESS] * 3


def test_202_is_read_per_instance(stow_server, three_srs):
    ok, out_of_space, mismatch = (str(sr.SOPInstanceUID) for sr in three_srs)
    stow_server.respond = lambda uids: (202, stow_body(stored=[ok], failed={out_of_space: 0xA700, mismatch: 0xA900}))

    outcomes = stow_datasets(stow_server.url, three_srs)

    assert kinds(outcomes) == [OutcomeKind.SUCCESS, OutcomeKind.TRANSIENT, OutcomeKind.PERMANENT]
    assert [outcome.key for outcome in outcomes] == [ok, out_of_space, mismatch]
    assert "0xA700" in outcomes[1].message and "0xA900" in outcomes[2].message
    assert all(outcome.code == 202 for outcome in outcomes)


def test_a_warning_reason_is_a_success_with_a_note(stow_server, three_srs):
    stow_server.respond = lambda uids: (202, stow_body(stored=uids, warned={uids[0]: 0xB000}))
    outcomes = stow_datasets(stow_server.url, three_srs)
    assert kinds(outcomes) == [OutcomeKind.SUCCESS] * 3
    assert outcomes[0].warning == "warning reason 0xB000"


def test_409_none_stored_follows_each_failure_reason(stow_server, three_srs):
    stow_server.respond = lambda uids: (409, stow_body(failed={uids[0]: 0xC000, uids[1]: 0xC122, uids[2]: 0x0110}))
    outcomes = stow_datasets(stow_server.url, three_srs)
    assert kinds(outcomes) == [OutcomeKind.PERMANENT, OutcomeKind.PERMANENT, OutcomeKind.TRANSIENT]


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, OutcomeKind.PERMANENT),
        (415, OutcomeKind.CONFIG_ERROR),
        (401, OutcomeKind.CONFIG_ERROR),
        (403, OutcomeKind.CONFIG_ERROR),
        (404, OutcomeKind.CONFIG_ERROR),
        (429, OutcomeKind.TRANSIENT),
        (500, OutcomeKind.TRANSIENT),
        (503, OutcomeKind.TRANSIENT),
    ],
)
def test_http_statuses_are_classified(stow_server, three_srs, status, kind):
    stow_server.respond = lambda uids: (status, None)
    outcomes = stow_datasets(stow_server.url, three_srs)
    assert kinds(outcomes) == [kind] * 3
    assert all(outcome.code == status for outcome in outcomes)
    assert all("Doe" not in outcome.describe() for outcome in outcomes)


def test_basic_auth(stow_server, three_srs):
    stow_datasets(stow_server.url, three_srs[:1], auth=HttpAuth(kind="basic", username="pacs", password="s3cret"))
    header = stow_server.requests[0]["headers"]["Authorization"]
    assert header == "Basic " + base64.b64encode(b"pacs:s3cret").decode()


def test_bearer_auth_keeps_the_token_out_of_repr(stow_server, three_srs):
    auth = HttpAuth(kind="bearer", token="tok-123")
    stow_datasets(stow_server.url, three_srs[:1], auth=auth)
    assert stow_server.requests[0]["headers"]["Authorization"] == "Bearer tok-123"
    assert "tok-123" not in repr(auth)


def test_a_server_that_is_down_is_transient(three_srs):
    outcomes = stow_datasets(f"http://127.0.0.1:{free_port()}/dicomweb", three_srs, timeout=2)
    assert kinds(outcomes) == [OutcomeKind.TRANSIENT] * 3
    assert outcomes[0].code is None


def test_a_timeout_is_transient(stow_server, three_srs):
    stow_server.hang.set()
    outcomes = stow_datasets(stow_server.url, three_srs[:1], timeout=1)
    assert kinds(outcomes) == [OutcomeKind.TRANSIENT]
    assert outcomes[0].code is None
