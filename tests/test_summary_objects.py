"""The summary image (Secondary Capture) and key object selection sent beside the SR.

Studies go through the real pipeline (demo model, routing, inference), the objects are checked
by dciodvfy (dicom3tools) and delivered to Orthanc by C-STORE and STOW-RS.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import KeyObjectSelectionDocumentStorage, SecondaryCaptureImageStorage

from pacslens.demo_study import demo_study_write
from results.deliver.contents import result_payload
from results.deliver.ledger import deliveries_create, deliveries_run_pending, delivery_retry
from results.deliver.payload import Outcome, OutcomeKind, Protocol
from results.deliver.senders import outcome_combined
from results.deliver.sr import build_sr, sr_to_bytes
from results.deliver.summary import (
    DISCLAIMER_ASCII,
    OUTLINE_RGB,
    build_key_objects,
    build_summary_image,
    summary_to_bytes,
)
from results.inference.demo_model import ensure_demo_setup
from results.inference.runtime import sessions_clear
from results.models import Delivery, DeliveryState, Destination, InferenceResult
from results.tasks import infer_pending
from routing.models import Study
from routing.tasks import route_study
from tests.support.factories import dicom_destination, receive
from tests.support.net import require_program

pytestmark = pytest.mark.django_db


@pytest.fixture
def demo_site(data_dir):
    sessions_clear()
    ensure_demo_setup()


def inferred(data_dir, *, lesion: bool, seed: int) -> tuple[Study, InferenceResult]:
    """A demo study received, routed and inferred by the demonstration model, as workers do."""
    demo = demo_study_write(outdir=None, slices=24, size=128, lesion=lesion, seed=seed)
    for ds in demo.datasets:
        study = receive(data_dir, ds)
    study.transition("complete", from_states=["receiving"], detail="test")
    route_study(study.pk)
    assert infer_pending() == 1
    return study, InferenceResult.objects.get(study=study)


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's error lines for a Part 10 file (warnings are allowed, errors are not)."""
    program = require_program("dciodvfy")
    run = subprocess.run([program, "-new", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


class TestKeyRegion:
    def test_a_flagged_study_records_the_key_slice_and_region(self, demo_site, data_dir):
        study, result = inferred(data_dir, lesion=True, seed=11)
        assert result.flagged
        region = result.key_region
        assert region["instance"] in result.evaluated_instances
        row0, col0, row1, col1 = region["bbox"]
        assert 0 <= row0 < row1 < 128 and 0 <= col0 < col1 < 128
        assert region["pixels"] >= 12
        # The box lies on the lesion: its pixels there are at acute-blood density.
        key = result_payload(result=result).key_image
        assert key is not None
        from pydicom import dcmread

        ds = dcmread(key)
        hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert 50 <= np.median(hu[row0 : row1 + 1, col0 : col1 + 1]) <= 90

    def test_a_clean_study_records_none(self, demo_site, data_dir):
        _, result = inferred(data_dir, lesion=False, seed=12)
        assert result.flagged is False
        assert result.key_region == {}
        # The summary still has a key slice to show: the middle of what the model read.
        payload = result_payload(result=result)
        assert payload.key_image is not None and payload.key_bbox is None


class TestObjects:
    def test_sc_kos_and_sr_pass_dciodvfy_and_are_the_same_on_every_build(self, demo_site, data_dir, tmp_path):
        _, result = inferred(data_dir, lesion=True, seed=13)
        payload = result_payload(result=result)
        sc = build_summary_image(payload)
        kos = build_key_objects(payload, sc)
        sr = build_sr(payload, summary=sc)
        for name, encoded in (
            ("sc", summary_to_bytes(sc)),
            ("kos", summary_to_bytes(kos)),
            ("sr", sr_to_bytes(sr)),
        ):
            path = tmp_path / f"{name}.dcm"
            path.write_bytes(encoded)
            assert dciodvfy(path) == [], name
        # Deterministic: a re-send is byte for byte the same object, under the same UIDs.
        assert summary_to_bytes(build_summary_image(payload)) == summary_to_bytes(sc)
        assert summary_to_bytes(build_key_objects(payload, sc)) == summary_to_bytes(kos)
        uids = {sc.SOPInstanceUID, kos.SOPInstanceUID, sr.SOPInstanceUID}
        series = {sc.SeriesInstanceUID, kos.SeriesInstanceUID, sr.SeriesInstanceUID}
        assert len(uids) == 3 and len(series) == 3
        assert sc.StudyInstanceUID == kos.StudyInstanceUID == sr.StudyInstanceUID == payload.study_instance_uid
        assert sc.SOPClassUID == SecondaryCaptureImageStorage
        assert kos.SOPClassUID == KeyObjectSelectionDocumentStorage
        # The SR references the summary image; the KOS flags the key slice and the summary image.
        evidence = {
            item.ReferencedSOPInstanceUID
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series_item in study.ReferencedSeriesSequence
            for item in series_item.ReferencedSOPSequence
        }
        assert sc.SOPInstanceUID in evidence
        selected = {
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in kos.ContentSequence
            if item.ValueType == "IMAGE"
        }
        assert sc.SOPInstanceUID in selected and sc.SourceImageSequence[0].ReferencedSOPInstanceUID in selected
        # The outline is drawn, the warning is in the header; no patient data in the picture's text.
        pixels = sc.pixel_array
        assert (pixels == np.array(OUTLINE_RGB, dtype=np.uint8)).all(axis=2).sum() > 20
        assert sc.ImageComments.startswith(DISCLAIMER_ASCII)
        assert sc.BurnedInAnnotation == "NO"

    def test_a_clean_result_s_summary_has_no_outline(self, demo_site, data_dir):
        _, result = inferred(data_dir, lesion=False, seed=14)
        sc = build_summary_image(result_payload(result=result))
        assert not (sc.pixel_array == np.array(OUTLINE_RGB, dtype=np.uint8)).all(axis=2).any()

    def test_one_failed_object_fails_the_delivery_with_the_worst_outcome(self):
        ok = Outcome(OutcomeKind.SUCCESS, Protocol.DICOM, 0, "stored", "1.2")
        transient = Outcome(OutcomeKind.TRANSIENT, Protocol.DICOM, 0xA700, "out of resources", "1.3")
        refused = Outcome(OutcomeKind.PERMANENT, Protocol.DICOM, 0x0122, "SOP class not supported", "1.4")
        assert outcome_combined([ok, ok, ok], total=3) == ok
        combined = outcome_combined([transient, refused, ok], total=3)
        assert combined.kind is OutcomeKind.PERMANENT
        assert combined.message == "SOP class not supported (1 of 3 objects stored)"


class TestOrthanc:
    """Orthanc as the PACS: SC, KOS and SR land in the source study, once each after a re-send."""

    @pytest.mark.parametrize("kind", ["dicom", "dicomweb"])
    def test_they_arrive_in_the_source_study_once(self, demo_site, data_dir, orthanc, kind):
        orthanc.clear()
        study, result = inferred(data_dir, lesion=True, seed=15)
        # The source study is in the PACS already, as it would be.
        key = result_payload(result=result).key_image
        assert key is not None
        orthanc.upload(Path(key))
        rule = study.routing_decision().matched_rules[0]["id"]
        options = {"send_summary_image": True, "send_key_objects": True}
        if kind == "dicom":
            from routing.models import RoutingRule

            destination = dicom_destination(
                RoutingRule.objects.get(pk=rule), orthanc.dicom_port, ae_title=orthanc.aet, **options
            )
        else:
            destination = Destination.objects.create(
                name="pacs-web", kind="dicomweb", base_url=orthanc.dicomweb_url, **options
            )
            destination.rules.add(rule)
        # The inference transaction made no row (no destination then): make it as a re-route would.
        [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule])
        deliveries_run_pending()
        delivery.refresh_from_db()
        assert delivery.state == DeliveryState.DELIVERED, delivery.last_error
        delivery_retry(deliveries=Delivery.objects.filter(pk=delivery.pk), actor="test")
        deliveries_run_pending()
        delivery.refresh_from_db()
        assert delivery.state == DeliveryState.DELIVERED, delivery.last_error
        [orthanc_study] = orthanc.find_instances({"StudyInstanceUID": study.study_instance_uid}, level="Study")
        assert orthanc.instance_count() == 4  # the key slice, SC, KOS, SR: one copy each
        modalities = {}
        for found in orthanc.find_instances({"StudyInstanceUID": study.study_instance_uid}):
            tags = orthanc.instance_tags(found["ID"])
            assert tags["StudyInstanceUID"] == study.study_instance_uid
            modalities[tags["SOPClassUID"]] = tags
        assert (
            modalities[SecondaryCaptureImageStorage]["SeriesDescription"] == "PacsLens AI summary (not for diagnosis)"
        )
        assert modalities[KeyObjectSelectionDocumentStorage]["Modality"] == "KO"
        assert modalities["1.2.840.10008.5.1.4.1.1.88.34"]["SOPInstanceUID"] == delivery.idempotency_key
        assert orthanc_study


class TestConfiguration:
    def test_only_dicom_destinations_send_images_and_the_yaml_carries_the_options(self, data_dir, rule):
        from django.core.exceptions import ValidationError

        from pacslens.site_config.destinations import DestinationsSection
        from tests.support.factories import make_destination

        ris = make_destination(send_summary_image=True)
        with pytest.raises(ValidationError) as caught:
            ris.full_clean()
        assert "Only DICOM and DICOMweb" in str(caught.value.message_dict["send_summary_image"])
        web = Destination.objects.create(
            name="web", kind="dicomweb", base_url="http://pacs.example/dicom-web", send_key_objects=True
        )
        web.full_clean()
        entries = {e["name"]: e for e in DestinationsSection().export()}
        assert entries["web"]["send_key_objects"] is True and entries["web"]["send_summary_image"] is False
