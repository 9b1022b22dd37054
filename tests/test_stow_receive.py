"""The STOW-RS receive endpoint: dicomweb-client and Orthanc as senders over real HTTP, and the
per-instance answers, authentication and limits through Django's test client."""

from __future__ import annotations

import io
import json

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client
from django_q.models import OrmQ

from routing.models import ApplicationEntity, Instance, StoreAssociation, StowSender, Study
from routing.receive import stow
from routing.receive.multipart import MAX_PREAMBLE_BYTES, MultipartError, iter_parts
from tests.support.ct import make_ct_slices
from tests.support.dicom_files import part10_bytes

URL = "/dicomweb/studies"
BOUNDARY = "pacslens-test-boundary-7f3a"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def multipart(parts: list[bytes]) -> bytes:
    body = b"".join(
        b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" for part in parts
    )
    return body + b"--" + BOUNDARY.encode() + b"--\r\n"


def post(client: Client, parts: list[bytes], *, token: str | None, url: str = URL, **extra):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    return client.post(url, data=multipart(parts), content_type=CONTENT_TYPE, **headers, **extra)


def post_chunked(client: Client, body: bytes, *, token: str):
    """As gunicorn hands over a chunked request: no Content-Length, the de-chunked body on wsgi.input."""
    return client.generic(
        "POST",
        URL,
        HTTP_AUTHORIZATION=f"Bearer {token}",
        HTTP_TRANSFER_ENCODING="chunked",
        CONTENT_LENGTH="",
        CONTENT_TYPE=CONTENT_TYPE,
        **{"wsgi.input": io.BytesIO(body)},
    )


def sequence(body: dict, tag: str) -> list[dict]:
    return body.get(tag, {}).get("Value", [])


@pytest.fixture
def token(db, data_dir) -> str:
    return StowSender.create_with_token(name="ORTHANC_WEB")[1]


class TestAuthentication:
    def test_missing_token_is_401(self, client, token):
        response = post(client, [part10_bytes(make_ct_slices(1)[0])], token=None)
        assert response.status_code == 401
        assert response["WWW-Authenticate"].startswith("Bearer")
        assert not Instance.objects.exists()

    def test_wrong_and_revoked_tokens_are_401(self, client, token):
        part = part10_bytes(make_ct_slices(1)[0])
        assert post(client, [part], token=token + "x").status_code == 401
        StowSender.objects.get().revoke()
        assert post(client, [part], token=token).status_code == 401
        assert not Instance.objects.exists()

    def test_a_staff_session_is_not_accepted(self, token):
        staff = User.objects.create_superuser("staff", password="correct horse battery")
        browser = Client(enforce_csrf_checks=True)
        browser.force_login(staff)
        response = post(browser, [part10_bytes(make_ct_slices(1)[0])], token=None)
        assert response.status_code == 401

    def test_only_post(self, client, token):
        assert client.get(URL, HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 405


class TestPerInstanceOutcome:
    def test_mismatched_and_corrupt_parts_fail_while_good_ones_are_stored(self, client, token, data_dir):
        good = make_ct_slices(2)
        other_study = make_ct_slices(1)[0]
        corrupt = b"\x00" * 128 + b"DICM" + b"\xff" * 300
        parts = [part10_bytes(good[0]), part10_bytes(other_study), corrupt, part10_bytes(good[1])]

        response = post(client, parts, token=token, url=f"{URL}/{good[0].StudyInstanceUID}")

        assert response.status_code == 202
        assert response["Content-Type"] == "application/dicom+json"
        body = json.loads(response.content)
        stored = [item["00081155"]["Value"][0] for item in sequence(body, "00081199")]
        assert stored == [good[0].SOPInstanceUID, good[1].SOPInstanceUID]
        failures = {
            item.get("00081155", {}).get("Value", ["?"])[0]: item["00081197"]["Value"][0]
            for item in sequence(body, "00081198")
        }
        assert failures == {other_study.SOPInstanceUID: 0xA900, "?": 0xC000}
        assert set(Instance.objects.values_list("sop_instance_uid", flat=True)) == set(stored)
        assert list((data_dir / "incoming").iterdir()) == []
        association = StoreAssociation.objects.get(listener="stow-rs")
        assert (association.calling_ae_title, association.instances_received) == ("ORTHANC_WEB", 2)
        assert association.released_normally and association.ended_at

    def test_nothing_stored_is_409_and_xml_on_request(self, client, token):
        response = post(client, [b"not dicom at all"], token=token, HTTP_ACCEPT="application/dicom+xml")
        assert response.status_code == 409
        assert response["Content-Type"] == "application/dicom+xml"
        text = response.content.decode()
        assert 'tag="00081198"' in text and 'tag="00081197"' in text and '<Value number="1">49152</Value>' in text

    def test_duplicate_is_acknowledged_and_recorded_once(self, client, token):
        part = part10_bytes(make_ct_slices(1)[0])
        assert post(client, [part], token=token).status_code == 200
        assert post(client, [part], token=token).status_code == 200
        assert Instance.objects.count() == 1


class TestLimits:
    def test_request_over_the_size_limit_is_413(self, client, token, settings):
        settings.STOW_MAX_BYTES = 2048
        response = post(client, [part10_bytes(make_ct_slices(1)[0])] * 3, token=token)
        assert response.status_code == 413
        assert not Instance.objects.exists()

    def test_other_media_types_are_415(self, client, token):
        response = client.post(URL, data=b"{}", content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}")
        assert response.status_code == 415
        response = client.post(
            URL,
            data=multipart([b"{}"]),
            HTTP_AUTHORIZATION=f"Bearer {token}",
            content_type=f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
        )
        assert response.status_code == 415

    def test_truncated_body_is_400(self, client, token):
        body = multipart([part10_bytes(make_ct_slices(1)[0])])[:-40]
        response = client.post(URL, data=body, content_type=CONTENT_TYPE, HTTP_AUTHORIZATION=f"Bearer {token}")
        assert response.status_code == 400
        assert not Instance.objects.exists()


class TestHostileBodies:
    """Requests with a valid token that try to exhaust memory or disk, or to crash the parser."""

    def test_a_body_without_a_boundary_is_400_after_a_bounded_read(self, client, token, data_dir):
        preamble = b"x" * (MAX_PREAMBLE_BYTES + 1024)
        body = preamble + b"\r\n" + multipart([part10_bytes(make_ct_slices(1)[0])])  # valid, but too late
        response = client.post(URL, data=body, content_type=CONTENT_TYPE, HTTP_AUTHORIZATION=f"Bearer {token}")
        assert response.status_code == 400
        assert not Instance.objects.exists()

    def test_the_parser_stops_reading_an_endless_preamble(self, tmp_path):
        class Endless(io.RawIOBase):
            read_bytes = 0

            def read(self, size: int = -1) -> bytes:
                self.read_bytes += size
                return b"x" * size

        stream = Endless()
        with pytest.raises(MultipartError, match="no opening boundary"):
            list(iter_parts(stream, boundary=BOUNDARY, directory=tmp_path, max_bytes=2 * 1024**3))
        assert stream.read_bytes <= MAX_PREAMBLE_BYTES + 256 * 1024

    def test_a_boundary_outside_ascii_is_400(self, client, token):
        response = client.post(
            URL,
            data=multipart([part10_bytes(make_ct_slices(1)[0])]),
            content_type="multipart/related; type=\"application/dicom\"; boundary*=utf-8''%E2%82%AC%E2%82%ACx",
            HTTP_AUTHORIZATION=f"Bearer {token}",
        )
        assert response.status_code == 400
        assert "ASCII" in json.loads(response.content)["error"]

    def test_a_request_over_the_limit_mid_part_leaves_no_file(self, client, token, settings, data_dir):
        settings.STOW_MAX_BYTES = 400 * 1024
        response = post_chunked(client, multipart([b"\x00" * 1024**2]), token=token)
        assert response.status_code == 413
        assert list((data_dir / "incoming").iterdir()) == []

    def test_a_truncated_part_leaves_no_file(self, client, token, data_dir):
        body = multipart([b"\x00" * 1024**2])[: 600 * 1024]
        response = client.post(URL, data=body, content_type=CONTENT_TYPE, HTTP_AUTHORIZATION=f"Bearer {token}")
        assert response.status_code == 400
        assert list((data_dir / "incoming").iterdir()) == []

    def test_the_disk_floor_is_checked_while_writing(self, client, token, data_dir, monkeypatch):
        checks = []

        def space_low() -> bool:
            checks.append(1)
            return len(checks) > 1  # plenty of space when the request starts, then none

        monkeypatch.setattr(stow, "disk_space_low", space_low)
        response = post(client, [b"\x00" * 6 * 1024**2], token=token)
        assert response.status_code == 503
        assert "disk space" in json.loads(response.content)["error"]
        assert list((data_dir / "incoming").iterdir()) == []
        assert not Instance.objects.exists()

    def test_no_disk_space_at_the_start_is_503(self, client, token, monkeypatch):
        monkeypatch.setattr(stow, "disk_space_low", lambda: True)
        response = post(client, [part10_bytes(make_ct_slices(1)[0])], token=token)
        assert response.status_code == 503 and response["Retry-After"]

    @pytest.mark.parametrize(
        ("fields", "reason"), [({"enabled": False}, "is disabled"), ({"may_send": False}, "may not send")]
    )
    def test_a_sender_whose_ae_may_not_send_is_403(self, client, db, data_dir, fields, reason):
        entity = ApplicationEntity.objects.create(ae_title="RIS_WEB", **fields)
        _, linked = StowSender.create_with_token(name="RIS_WEB_STOW", application_entity=entity)
        _, by_title = StowSender.create_with_token(name="RIS_WEB")
        part = part10_bytes(make_ct_slices(1)[0])
        for secret in (linked, by_title):
            response = post(client, [part], token=secret)
            assert response.status_code == 403
            assert reason in json.loads(response.content)["error"]
        assert not Instance.objects.exists()

        ApplicationEntity.objects.filter(pk=entity.pk).update(enabled=True, may_send=True)
        assert post(client, [part], token=by_title).status_code == 200
        assert Instance.objects.get().study.sender == entity


class TestRealSenders:
    def test_dicomweb_client_stores_a_study(self, live_server, transactional_db, data_dir, settings):
        from dicomweb_client.api import DICOMwebClient

        settings.STUDY_RELEASE_GRACE = 0  # the completion check is asked for at once (else by the workers' timer)

        _, secret = StowSender.create_with_token(name="DWCLIENT")
        slices = make_ct_slices(3)
        # Above chunk_size the client switches to chunked transfer encoding, which Django's
        # development server (behind live_server) cannot read; gunicorn can.
        sender = DICOMwebClient(
            url=f"{live_server.url}/dicomweb", headers={"Authorization": f"Bearer {secret}"}, chunk_size=64 * 1024**2
        )
        answer = sender.store_instances(slices, study_instance_uid=slices[0].StudyInstanceUID)

        assert [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence] == [
            ds.SOPInstanceUID for ds in slices
        ]
        study = Study.objects.get(study_instance_uid=slices[0].StudyInstanceUID)
        assert study.instances.count() == 3 and study.calling_ae_title == "DWCLIENT"
        funcs = [q.task.get("func") for q in OrmQ.objects.all()]
        assert "routing.tasks.check_completion_after_release" in funcs

    def test_orthanc_pushes_a_study_to_us(self, live_server, transactional_db, data_dir, orthanc):
        _, secret = StowSender.create_with_token(name="ORTHANC")
        orthanc.clear()
        slices = make_ct_slices(2)
        for ds in slices:
            orthanc.upload(part10_bytes(ds))
        study_id = orthanc.rest(
            "POST", "/tools/lookup", raw=str(slices[0].StudyInstanceUID).encode(), content_type="text/plain"
        )[0]["ID"]
        orthanc.rest(
            "PUT",
            "/dicom-web/servers/pacslens",
            {
                "Url": f"{live_server.url}/dicomweb/",
                "HttpHeaders": {"Authorization": f"Bearer {secret}"},
                # Orthanc sends chunked by default: gunicorn de-chunks, Django's development server
                # (behind live_server) does not.
                "ChunkedTransfers": False,
            },
        )

        orthanc.rest("POST", "/dicom-web/servers/pacslens/stow", {"Resources": [study_id], "Synchronous": True})

        study = Study.objects.get(study_instance_uid=slices[0].StudyInstanceUID)
        assert sorted(study.instances.values_list("sop_instance_uid", flat=True)) == sorted(
            str(ds.SOPInstanceUID) for ds in slices
        )
        assert study.calling_ae_title == "ORTHANC"


class TestChunkedUnderGunicorn:
    def test_orthanc_pushes_chunked_to_gunicorn(self, gunicorn, orthanc):
        _, secret = StowSender.create_with_token(name="ORTHANC")
        orthanc.clear()
        slices = make_ct_slices(3)
        for ds in slices:
            orthanc.upload(part10_bytes(ds))
        study_id = orthanc.rest(
            "POST", "/tools/lookup", raw=str(slices[0].StudyInstanceUID).encode(), content_type="text/plain"
        )[0]["ID"]
        # Orthanc's default: chunked transfer encoding, no Content-Length.
        orthanc.rest(
            "PUT",
            "/dicom-web/servers/pacslens-gunicorn",
            {
                "Url": f"{gunicorn}/dicomweb/",
                "HttpHeaders": {"Authorization": f"Bearer {secret}"},
            },
        )

        orthanc.rest(
            "POST", "/dicom-web/servers/pacslens-gunicorn/stow", {"Resources": [study_id], "Synchronous": True}
        )

        study = Study.objects.get(study_instance_uid=slices[0].StudyInstanceUID)
        assert study.instances.count() == 3


class TestTokenCommand:
    def test_create_list_revoke(self, db):
        out, err = io.StringIO(), io.StringIO()
        call_command("stow_token", "create", "RIS_GATEWAY", stdout=out, stderr=err)
        secret = out.getvalue().strip()
        sender = StowSender.objects.get(name="RIS_GATEWAY")
        assert secret.startswith(StowSender.TOKEN_PREFIX)
        assert StowSender.authenticate(secret) == sender
        assert sender.token_hash != secret and secret not in sender.token_hash

        listing = io.StringIO()
        call_command("stow_token", "list", stdout=listing)
        assert "RIS_GATEWAY" in listing.getvalue() and secret not in listing.getvalue()

        call_command("stow_token", "revoke", "RIS_GATEWAY", stdout=io.StringIO())
        assert StowSender.authenticate(secret) is None
