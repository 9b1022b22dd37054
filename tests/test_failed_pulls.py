"""Retrieves and polls that failed for good: in the failure queue (retry, discard with a reason,
audited), in the study list, in /metrics; and a retried retrieve really fetches the study."""

from __future__ import annotations

import pytest
from django.test import Client
from django_q.models import OrmQ

from routing.models import AuditEntry, Poll, PollSource, Study, StudyRetrieve
from routing.pull.failed import DiscardReasonRequired, retrieve_discard
from routing.pull.poll import MAX_RETRIEVE_ATTEMPTS, retrieve_run_one, retrieves_run
from tests.support.net import free_port
from tests.support.pull import assert_no_patient_data, orthanc_study

HX = {"HTTP_HX_REQUEST": "true"}
UID = "1.2.826.0.1.3680043.8.498.777"


def failed_retrieve(source: PollSource, uid: str = UID) -> StudyRetrieve:
    return StudyRetrieve.objects.create(
        source=source,
        study_instance_uid=uid,
        state="failed",
        attempts=MAX_RETRIEVE_ATTEMPTS,
        last_status=0xA801,
        last_error="C-MOVE failed: 0xA801 (move destination unknown)",
    )


@pytest.fixture
def source(db) -> PollSource:
    return PollSource.objects.create(name="vna", kind="dicomweb", dicomweb_url="http://127.0.0.1:9/dicom-web")


@pytest.fixture
def informaticist(client, users):
    client.force_login(users["informaticist"])
    return client


@pytest.mark.django_db
@pytest.mark.usefixtures("plain_static_storage")
class TestFailureQueueSection:
    def test_failed_retrieves_and_failing_sources_are_listed(self, informaticist, source):
        record = failed_retrieve(source)
        PollSource.objects.filter(pk=source.pk).update(consecutive_failures=4)
        Poll.objects.create(source=source, status="failed", error="cannot reach QIDO-RS to 127.0.0.1:9")
        page = informaticist.get("/failures/").content.decode()
        assert 'id="failed-pulls"' in page and f'id="retrieve-{record.pk}"' in page and "0xA801" in page
        assert f'id="poll-source-{source.pk}"' in page and "cannot reach QIDO-RS" in page
        assert 'id="failure-table"' in page  # the deliveries' table is still there

    def test_retry_requeues_the_same_row_audits_and_wakes_a_worker(
        self, informaticist, source, django_capture_on_commit_callbacks
    ):
        record = failed_retrieve(source)
        with django_capture_on_commit_callbacks(execute=True):
            response = informaticist.post("/failures/retrieves/retry/", {"retrieve": record.pk}, **HX)
        page = response.content.decode()
        assert response["HX-Retarget"] == "#failed-pulls" and "<html" not in page and "1 retrieve queued again" in page
        record.refresh_from_db()
        assert (record.state, record.attempts) == ("pending", 0)
        entry = AuditEntry.objects.get(action="retry")
        assert (entry.actor, entry.object_type, entry.object_id) == (
            "informaticist",
            "routing.studyretrieve",
            str(record.pk),
        )
        tasks = [q.task for q in OrmQ.objects.all()]
        assert [(t["func"], t["args"]) for t in tasks] == [("routing.pull.poll.retrieve_run_one", (record.pk,))]
        # Already pending: a second retry does nothing
        informaticist.post("/failures/retrieves/retry/", {"selected": [record.pk]}, **HX)
        assert AuditEntry.objects.filter(action="retry").count() == 1

    def test_discard_needs_a_reason_then_leaves_the_queue(self, informaticist, source):
        record = failed_retrieve(source)
        page = informaticist.post(f"/failures/retrieves/{record.pk}/discard/", {"reason": " "}, **HX).content.decode()
        assert "A reason is required to discard a retrieve." in page
        response = informaticist.post(
            f"/failures/retrieves/{record.pk}/discard/", {"reason": "Study deleted on the PACS"}, **HX
        )
        assert "Retrieve discarded." in response.content.decode()
        record.refresh_from_db()
        assert (record.state, record.discarded_by, record.discard_reason) == (
            "discarded",
            "informaticist",
            "Study deleted on the PACS",
        )
        assert AuditEntry.objects.get(action="discard").detail == "reason: Study deleted on the PACS"
        assert f'id="retrieve-{record.pk}"' not in informaticist.get("/failures/").content.decode()
        with pytest.raises(DiscardReasonRequired):
            retrieve_discard(retrieve=record, actor="x", reason="")

    def test_poll_now_makes_a_failing_source_due(self, informaticist, source):
        PollSource.objects.filter(pk=source.pk).update(consecutive_failures=5)
        informaticist.post(f"/failures/poll-sources/{source.pk}/poll-now/", **HX)
        assert AuditEntry.objects.get(action="retry").detail == "poll now, after 5 failed polls"

    def test_informaticists_act_pacs_administrators_only_see(self, client, users, source):
        record = failed_retrieve(source)
        for role, allowed in (("admin", False), ("nobody", False), ("informaticist", True), ("superuser", True)):
            client.force_login(users[role])
            sees = client.get("/failures/retrieves/").status_code == 200
            assert sees is (allowed or role == "admin"), role
            retry = client.post("/failures/retrieves/retry/", {"retrieve": record.pk})
            assert (retry.status_code == 302) is allowed and (retry.status_code == 403) is not allowed, role
            StudyRetrieve.objects.filter(pk=record.pk).update(state="failed")
            discard = client.post(f"/failures/retrieves/{record.pk}/discard/", {"reason": ""})
            assert discard.status_code == (200 if allowed else 403), role

    def test_the_study_list_shows_studies_we_could_not_fetch(self, informaticist, source):
        failed_retrieve(source)
        page = informaticist.get("/studies/").content.decode()
        assert 'id="not-fetched"' in page and UID in page and "not fetched" in page

    def test_metrics(self, source):
        failed_retrieve(source)
        StudyRetrieve.objects.create(source=source, study_instance_uid="1.2.3", state="done")
        Poll.objects.create(source=source, status="failed")
        PollSource.objects.filter(pk=source.pk).update(consecutive_failures=2)
        text = Client(HTTP_HOST="localhost").get("/metrics").content.decode()
        assert 'pacslens_retrieves{source="vna",state="failed"} 1.0' in text
        assert 'pacslens_retrieves{source="vna",state="done"} 1.0' in text
        assert 'pacslens_polls_total{source="vna",status="failed"} 1.0' in text
        assert 'pacslens_poll_source_consecutive_failures{source="vna"} 2.0' in text


@pytest.mark.interop
@pytest.mark.usefixtures("plain_static_storage")
def test_a_retrieve_failed_for_good_is_retried_from_the_queue_and_fetched(
    transactional_db, data_dir, orthanc, settings, users, client
):
    """Real WADO-RS: the retrieve fails against a dead server until it gives up, the study shows
    as not fetched; once the server is right, Retry fetches it and the study completes."""
    settings.AE_TITLE = "PACSLENS"
    orthanc.clear()
    uid = orthanc_study(orthanc, 2)
    source = PollSource.objects.create(
        name="orthanc-web", kind="dicomweb", dicomweb_url=f"http://127.0.0.1:{free_port()}/dicom-web"
    )
    record = StudyRetrieve.objects.create(source=source, study_instance_uid=uid, attempts=MAX_RETRIEVE_ATTEMPTS - 1)
    assert retrieves_run(source=source, limit=1) == (0, 1)
    record.refresh_from_db()
    assert record.state == "failed" and record.last_error.startswith("cannot reach WADO-RS")
    assert_no_patient_data(record.last_error)

    client.force_login(users["informaticist"])
    assert f'id="retrieve-{record.pk}"' in client.get("/failures/").content.decode()
    PollSource.objects.filter(pk=source.pk).update(dicomweb_url=orthanc.dicomweb_url)
    client.post("/failures/retrieves/retry/", {"retrieve": record.pk})
    (task,) = [q.task for q in OrmQ.objects.all() if q.task["func"] == "routing.pull.poll.retrieve_run_one"]

    assert retrieve_run_one(*task["args"]) is True  # what the worker runs

    record.refresh_from_db()
    study = Study.objects.get(study_instance_uid=uid)
    assert (record.state, record.attempts, study.state, study.instances.count()) == ("done", 1, "complete", 2)
    assert f'id="retrieve-{record.pk}"' not in client.get("/failures/").content.decode()


@pytest.mark.django_db
@pytest.mark.usefixtures("plain_static_storage")
def test_stopping_a_failing_source_needs_a_reason_and_a_pacs_administrator(client, users, source):
    PollSource.objects.filter(pk=source.pk).update(consecutive_failures=6)
    client.force_login(users["informaticist"])
    assert "Stop polling" not in client.get("/failures/").content.decode()
    assert client.post(f"/failures/poll-sources/{source.pk}/stop/", {"reason": "x"}).status_code == 403
    client.force_login(users["admin"])
    assert "Stop polling" in client.get("/failures/").content.decode()
    page = client.post(f"/failures/poll-sources/{source.pk}/stop/", {"reason": ""}, **HX).content.decode()
    assert "A reason is required to stop polling a source." in page
    page = client.post(f"/failures/poll-sources/{source.pk}/stop/", {"reason": "PACS retired"}, **HX).content.decode()
    assert "vna is no longer polled." in page and f'id="poll-source-{source.pk}"' not in page
    source.refresh_from_db()
    assert not source.enabled
    entry = AuditEntry.objects.get(action="disable")
    assert entry.actor == "admin" and entry.detail == "stopped polling after 6 failed polls; reason: PACS retired"
