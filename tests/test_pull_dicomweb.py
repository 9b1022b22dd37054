"""Pull ingestion over DICOMweb from Orthanc's plugin: QIDO-RS to find, WADO-RS to retrieve."""

from __future__ import annotations

import pytest
from pydicom import dcmread

from routing.models import Instance, PollSource, StoreAssociation, Study, StudyRetrieve
from tests.support.net import free_port
from tests.support.pull import assert_no_patient_data, orthanc_study, poll_now, route_study_tasks

pytestmark = [pytest.mark.interop]


@pytest.fixture
def web_source(transactional_db, data_dir, orthanc, settings):
    settings.AE_TITLE = "PACSLENS"
    orthanc.clear()
    source = PollSource(
        name="orthanc-web",
        kind="dicomweb",
        dicomweb_url=orthanc.dicomweb_url,
        interval_seconds=2,
        min_query_spacing_seconds=0,
    )
    source.full_clean()
    source.save()
    return source


class TestQidoWado:
    def test_studies_appear_once_complete_and_are_enqueued(self, web_source, orthanc, data_dir):
        first, second = orthanc_study(orthanc, 3), orthanc_study(orthanc, 2)

        poll = poll_now(web_source)

        assert (poll.status, poll.matches, poll.new, poll.retrieved) == ("ok", 2, 2, 2)
        for uid, count in ((first, 3), (second, 2)):
            study = Study.objects.get(study_instance_uid=uid)
            assert study.state == "complete"
            assert study.instances.count() == count
            assert study.events.get(kind="complete").detail.startswith("retrieve finished: WADO-RS from orthanc-web")
        instance = Instance.objects.first()
        stored = dcmread(data_dir / instance.path)
        assert stored.SOPInstanceUID == instance.sop_instance_uid and stored.PixelData
        assert StoreAssociation.objects.filter(listener__startswith="pull:retrieve:").count() == 2
        assert sorted(a[0] for a in route_study_tasks()) == sorted(Study.objects.values_list("pk", flat=True))

        again = poll_now(web_source)

        assert (again.matches, again.new, again.retrieved) == (2, 0, 0)
        assert Instance.objects.count() == 5
        assert set(StudyRetrieve.objects.values_list("attempts", flat=True)) == {1}

    def test_modality_filter(self, web_source, orthanc):
        orthanc_study(orthanc, 1)
        PollSource.objects.filter(pk=web_source.pk).update(modalities="MR")
        web_source.refresh_from_db()

        poll = poll_now(web_source)

        assert (poll.status, poll.matches) == ("ok", 0)

    def test_unreachable_endpoint_fails_visibly_then_recovers(self, web_source, orthanc):
        orthanc_study(orthanc, 1)
        url = web_source.dicomweb_url
        PollSource.objects.filter(pk=web_source.pk).update(dicomweb_url=f"http://127.0.0.1:{free_port()}/dicom-web")
        web_source.refresh_from_db()

        failed = poll_now(web_source)

        assert failed.status == "failed"
        assert failed.error.startswith("cannot reach QIDO-RS to 127.0.0.1:")
        assert_no_patient_data(failed.error)

        PollSource.objects.filter(pk=web_source.pk).update(dicomweb_url=url)
        web_source.refresh_from_db()
        assert poll_now(web_source).retrieved == 1

    def test_missing_token_variable_is_a_configuration_error(self, web_source, monkeypatch):
        monkeypatch.delenv("PACSLENS_POLL_TOKEN_TEST_MISSING", raising=False)
        PollSource.objects.filter(pk=web_source.pk).update(dicomweb_token_env="PACSLENS_POLL_TOKEN_TEST_MISSING")
        web_source.refresh_from_db()

        poll = poll_now(web_source)

        assert poll.status == "failed"
        assert "PACSLENS_POLL_TOKEN_TEST_MISSING" in poll.error
