"""Inference service and tasks over studies ingested from generated files (no network)."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnx
import pydicom
import pytest
from django.conf import settings
from django.utils import timezone
from onnx import TensorProto, helper, numpy_helper

from pacslens.demo_study import demo_study_write
from results.inference.demo_model import ensure_demo_setup
from results.inference.runtime import (
    InferenceTimeout,
    session_for,
    session_run,
    sessions_clear,
)
from results.inference.services import inference_run_pending, study_claim_next
from results.models import (
    AIModel,
    FailureReason,
    ImmutableResultError,
    InferenceResult,
    ResultStatus,
    WebhookEvent,
    WebhookSubscription,
)
from results.tasks import infer_pending, sweep_inference
from routing.models import Operator, Priority, RoutingRule, Study, StudyState
from routing.store.spool import incoming_dir, instance_store
from routing.tasks import route_study, sweep_completion

pytestmark = pytest.mark.django_db


def process_study(study_id: int) -> int:
    """What the workers do when a study completes: routing's task, then the inference it wakes."""
    route_study(study_id)
    return infer_pending()


def ingest(paths, calling="CT01", complete=True) -> Study:
    """Store files as the listener would, then mark the study complete."""
    for path in paths:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        temp = incoming_dir() / f"{header.SOPInstanceUID}.tmp"
        shutil.copyfile(path, temp)
        result = instance_store(
            temp_path=temp,
            request_sop_class_uid=header.SOPClassUID,
            request_sop_instance_uid=header.SOPInstanceUID,
            transfer_syntax_uid=header.file_meta.TransferSyntaxUID,
            calling_ae_title=calling,
            called_ae_title="PACSLENS",
        )
        assert result.ok, result.message
    study = Study.objects.get(study_instance_uid=header.StudyInstanceUID)
    if complete:
        assert study.transition(StudyState.COMPLETE, from_states=[StudyState.RECEIVING], detail="test")
    return study


def demo(tmp_path, name="s", **kwargs):
    kwargs.setdefault("slices", 24)
    kwargs.setdefault("size", 128)
    return demo_study_write(outdir=tmp_path / name, **kwargs)


@pytest.fixture
def demo_site(data_dir):
    sessions_clear()
    line = ensure_demo_setup()
    assert "routing rule" in line
    return AIModel.objects.get()


class TestPipeline:
    def test_a_lesion_study_is_flagged_with_timings_and_a_full_timeline(self, demo_site, tmp_path):
        study = ingest(demo(tmp_path, lesion=True, seed=1).paths)
        assert process_study(study.pk) == 1
        study.refresh_from_db()
        assert study.state == StudyState.INFERRED
        result = InferenceResult.objects.get(study=study)
        assert result.status == ResultStatus.SUCCEEDED
        assert result.flagged and result.score > demo_site.threshold
        assert result.label == "hyperdense region"
        assert result.outputs["hyperdense_volume_ml"] > 0.5
        assert (result.model_name, result.model_version, result.model_sha256) == (
            demo_site.name,
            demo_site.version,
            demo_site.sha256,
        )
        assert result.instance_count == 24 and result.series == study.series.get()
        # The slices the model read, as internal ids of this series: the SR cites exactly these.
        series_ids = set(study.series.get().instances.values_list("pk", flat=True))
        assert result.evaluated_instances and set(result.evaluated_instances) <= series_ids
        from results.deliver.contents import result_payload

        assert len(result_payload(result=result).source_instances) == len(result.evaluated_instances)
        assert all(
            t is not None and t >= 0 for t in (result.load_seconds, result.preprocess_seconds, result.infer_seconds)
        )
        kinds = list(study.events.values_list("kind", flat=True))
        assert kinds == ["receiving", "complete", "routed", "inferring", "inferred"]

    def test_a_flagged_live_result_is_a_webhook_event_written_with_it(self, demo_site, tmp_path):
        WebhookSubscription.objects.create(name="engine", webhook_url="https://e.example.org/h", secret="s" * 20)
        flagged = ingest(demo(tmp_path, lesion=True, seed=1).paths)
        process_study(flagged.pk)
        clean = ingest(demo(tmp_path, "clean", seed=2).paths)
        process_study(clean.pk)
        [event] = WebhookEvent.objects.all()
        result = InferenceResult.objects.get(study=flagged)
        assert event.event_type == "result.flagged" and event.state == "pending"
        assert event.payload == {
            "study": {"id": flagged.pk, "study_instance_uid": flagged.study_instance_uid},
            "result": {
                "uid": str(result.uid),
                "model": demo_site.name,
                "model_version": demo_site.version,
                "score": result.score,
                "flagged": True,
                "label": "hyperdense region",
            },
        }

    def test_a_clean_study_is_not_flagged(self, demo_site, tmp_path):
        study = ingest(demo(tmp_path, seed=2).paths)
        process_study(study.pk)
        result = InferenceResult.objects.get(study=study)
        assert result.flagged is False and result.score < demo_site.threshold
        assert result.label == "no hyperdense region"

    @pytest.mark.parametrize("syntax", ["rle", "jpeg2000"])
    def test_compressed_studies_are_decoded(self, demo_site, tmp_path, syntax):
        study = ingest(demo(tmp_path, lesion=True, seed=3, slices=12, transfer_syntax=syntax).paths)
        process_study(study.pk)
        assert InferenceResult.objects.get(study=study).flagged is True

    def test_a_study_no_rule_matches_is_ignored(self, demo_site, tmp_path):
        study = ingest(demo(tmp_path, body_part="CHEST", seed=4).paths)
        assert process_study(study.pk) == 0
        study.refresh_from_db()
        assert study.state == StudyState.IGNORED
        assert "no rule matched" in study.events.last().detail
        assert not InferenceResult.objects.exists()

    def test_an_mr_study_routed_to_a_ct_model_is_not_applicable(self, demo_site, tmp_path):
        rule = RoutingRule.objects.create(name="any head", position=1)
        rule.conditions.create(attribute="BodyPartExamined", operator=Operator.EQUALS, value="HEAD")
        rule.ai_models.add(demo_site)
        study = ingest(demo(tmp_path, modality="MR", seed=5).paths)
        process_study(study.pk)
        study.refresh_from_db()
        result = InferenceResult.objects.get(study=study)
        assert result.status == ResultStatus.NOT_APPLICABLE
        assert "accepts CT; the study has MR" in result.message
        assert study.state == StudyState.IGNORED

    def test_corrupt_pixel_data_fails_with_a_reason(self, demo_site, tmp_path):
        study = ingest(demo(tmp_path, lesion=True, corrupt_pixels=True, seed=6).paths)
        process_study(study.pk)
        study.refresh_from_db()
        result = InferenceResult.objects.get(study=study)
        assert study.state == StudyState.FAILED
        assert result.status == ResultStatus.FAILED
        assert result.failure_reason == FailureReason.UNREADABLE_PIXELS
        assert "Pixel Data has" in result.message
        assert result.score is None and result.flagged is None
        assert study.events.last().kind == "failed" and "unreadable_pixels" in study.events.last().detail

    def test_too_few_slices_is_no_suitable_series(self, demo_site, tmp_path):
        # The demo model takes a single slice; a model that needs 8 says why it did not run.
        demo_site.manifest["series"]["min_slices"] = 8
        demo_site.save()
        study = ingest(demo(tmp_path, slices=3, seed=7).paths)
        process_study(study.pk)
        result = InferenceResult.objects.get(study=study)
        assert result.failure_reason == FailureReason.NO_SUITABLE_SERIES
        assert "has 3 images (needs 8-2000)" in result.message

    def test_a_tampered_model_file_refuses_to_run(self, demo_site, tmp_path):
        with open(demo_site.file_path, "ab") as fh:
            fh.write(b"\0")
        study = ingest(demo(tmp_path, seed=8).paths)
        process_study(study.pk)
        result = InferenceResult.objects.get(study=study)
        assert result.failure_reason == FailureReason.MODEL_ERROR
        assert "refusing to run" in result.message

    def test_a_model_timeout_is_a_failure_with_its_reason(self, demo_site, tmp_path, monkeypatch):
        def slow(*args, **kwargs):
            raise InferenceTimeout("the model ran longer than 1 s and was stopped")

        monkeypatch.setattr("results.inference.services.session_run", slow)
        study = ingest(demo(tmp_path, seed=9).paths)
        process_study(study.pk)
        assert InferenceResult.objects.get(study=study).failure_reason == FailureReason.TIMEOUT


class TestResults:
    def test_results_are_never_edited(self, demo_site, tmp_path):
        study = ingest(demo(tmp_path, seed=10).paths)
        process_study(study.pk)
        result = InferenceResult.objects.get()
        result.score = 0.99
        with pytest.raises(ImmutableResultError):
            result.save()

    def test_an_amended_study_is_inferred_again_and_supersedes(self, demo_site, tmp_path):
        first = demo(tmp_path, "first", seed=11, slices=20)
        study = ingest(first.paths)
        process_study(study.pk)
        old = InferenceResult.objects.get()
        # A late instance of the same series re-opens the study (the lead's ingest rule).
        late = pydicom.dcmread(first.paths[0])
        late.SOPInstanceUID = pydicom.uid.generate_uid()
        late.InstanceNumber = 99
        late.save_as(tmp_path / "late.dcm", enforce_file_format=True)
        study = ingest([tmp_path / "late.dcm"])
        assert "amended" in study.events.values_list("kind", flat=True)
        process_study(study.pk)
        new = InferenceResult.objects.exclude(pk=old.pk).get()
        assert new.supersedes == old and new.instance_count == 21
        assert not old.is_current and new.is_current
        old.refresh_from_db()
        assert old.instance_count == 20  # untouched

    def test_a_study_re_opened_during_inference_keeps_no_stale_result(self, demo_site, tmp_path, monkeypatch):
        import results.inference.services as inference

        study = ingest(demo(tmp_path, seed=12).paths)
        real = inference.model_infer

        def reopen_meanwhile(*, study, model):
            result = real(study=study, model=model)
            study.transition(StudyState.RECEIVING, kind="amended", detail="test")
            return result

        monkeypatch.setattr(inference, "model_infer", reopen_meanwhile)
        process_study(study.pk)
        assert not InferenceResult.objects.exists()
        assert Study.objects.get(pk=study.pk).state == StudyState.RECEIVING


class TestOrdering:
    def test_stat_studies_overtake_a_backlog_of_routine_ones(self, demo_site, tmp_path):
        stat_rule = RoutingRule.objects.create(name="stat", position=1, priority=Priority.STAT)
        stat_rule.conditions.create(attribute="CallingAETitle", operator=Operator.EQUALS, value="ER_CT")
        stat_rule.ai_models.add(demo_site)
        routine = [ingest(demo(tmp_path, f"r{i}", seed=20 + i, slices=10, size=64).paths) for i in range(4)]
        stat = ingest(demo(tmp_path, "stat", seed=30, slices=10, size=64).paths, calling="ER_CT")
        from routing.rules import study_route

        for study in routine + [stat]:  # the STAT study arrives last, behind the backlog
            study_route(study=study)
        assert Study.objects.get(pk=stat.pk).priority == Priority.STAT
        assert study_claim_next().pk == stat.pk
        Study.objects.filter(pk=stat.pk).update(state=StudyState.ROUTED)
        inference_run_pending()
        order = list(InferenceResult.objects.order_by("id").values_list("study_id", flat=True))
        assert order == [stat.pk] + [s.pk for s in routine]  # then oldest routine first

    def test_a_claim_is_taken_once(self, demo_site, tmp_path):
        study = ingest(demo(tmp_path, seed=40, slices=10, size=64).paths)
        from routing.rules import study_route

        study_route(study=study)
        assert study_claim_next().pk == study.pk
        assert study_claim_next() is None

    def test_a_task_for_a_study_already_done_finds_no_work(self, demo_site, tmp_path):
        study = ingest(demo(tmp_path, seed=41, slices=10, size=64).paths)
        assert process_study(study.pk) == 1
        assert process_study(study.pk) == 0
        assert InferenceResult.objects.count() == 1


class TestSweep:
    def test_it_routes_and_infers_studies_whose_task_was_lost(self, demo_site, tmp_path):
        study = ingest(demo(tmp_path, seed=50, slices=10, size=64).paths)
        Study.objects.filter(pk=study.pk).update(completed_at=timezone.now() - timedelta(minutes=5))
        sweep_completion()  # routes complete studies whose task was lost
        assert sweep_inference() == 1
        assert Study.objects.get(pk=study.pk).state == StudyState.INFERRED

    def test_it_infers_a_study_stuck_inferring_again(self, demo_site, tmp_path):
        study = ingest(demo(tmp_path, seed=52, slices=10, size=64).paths)
        from routing.rules import study_route

        study_route(study=study)
        study_claim_next()  # ... and the worker is killed
        Study.objects.filter(pk=study.pk).update(state_changed_at=timezone.now() - timedelta(hours=1))
        sweep_inference()
        study.refresh_from_db()
        assert study.state == StudyState.INFERRED
        assert InferenceResult.objects.get().status == ResultStatus.SUCCEEDED
        assert "inference_retry" in list(study.events.values_list("kind", flat=True))

    def test_it_fails_studies_stuck_inferring_twice(self, demo_site, tmp_path, settings):
        study = ingest(demo(tmp_path, seed=51, slices=10, size=64).paths)
        from results.inference.services import studies_inferring_stale
        from routing.rules import study_route

        study_route(study=study)
        for _ in range(2):  # claimed, its worker killed, swept; again
            study_claim_next()
            Study.objects.filter(pk=study.pk).update(state_changed_at=timezone.now() - timedelta(hours=1))
            studies_inferring_stale(older_than=timedelta(minutes=5))
        study.refresh_from_db()
        assert study.state == StudyState.FAILED
        result = InferenceResult.objects.get()
        assert result.failure_reason == FailureReason.TIMEOUT and "worker stopped" in result.message


class TestRuntime:
    def test_sessions_are_created_once_per_process(self, demo_site):
        assert session_for(demo_site) is session_for(demo_site)

    def test_a_run_over_its_timeout_is_stopped(self, tmp_path):
        # A chain of large matrix products: seconds of work, stopped after a fraction of one.
        size = 768
        weight = numpy_helper.from_array(np.full((size, size), 1e-3, dtype=np.float32), "w")
        nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", "w"], [f"h{i + 1}"]) for i in range(400)]
        nodes.append(helper.make_node("Identity", ["h400"], ["y"]))
        graph = helper.make_graph(
            nodes,
            "slow",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, size])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])],
            [weight],
        )
        path = tmp_path / "slow.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        with pytest.raises(InferenceTimeout):
            session_run(session, input_name="x", tensor=np.ones((size, size), np.float32), timeout=0.2)


class TestStatusAndSetup:
    def test_study_status_shows_the_routing_decision_and_results(self, demo_site, tmp_path, capsys):
        import json

        from django.core.management import call_command

        study = ingest(demo(tmp_path, lesion=True, seed=60, slices=12, size=64).paths)
        process_study(study.pk)
        call_command("study_status", study.study_instance_uid, "--json")
        data = json.loads(capsys.readouterr().out)
        assert data["routing"]["matched_rules"] == ["Demo: CT head to the demonstration model"]
        assert data["routing"]["models"] == ["demo-hyperdense-head-ct 2.0"]
        assert data["routing"]["priority"] == "routine"
        [result] = data["results"]
        assert result["status"] == "succeeded" and result["flagged"] is True and result["current"] is True
        assert result["demonstration"] is True and result["infer_seconds"] is not None
        call_command("study_status", study.study_instance_uid)
        out = capsys.readouterr().out
        assert "Routing    Demo: CT head to the demonstration model -> demo-hyperdense-head-ct 2.0" in out
        assert "FLAGGED" in out and "(demonstration)" in out
        assert "ZZDEMO" not in out  # no patient data in support output

    def test_study_status_explains_why_no_rule_matched(self, demo_site, tmp_path, capsys):
        from django.core.management import call_command

        study = ingest(demo(tmp_path, body_part="CHEST", seed=61, slices=8, size=64).paths)
        process_study(study.pk)
        call_command("study_status", study.study_instance_uid)
        out = capsys.readouterr().out
        assert "Routing    no rule -> nothing to run" in out
        assert "saw 'CHEST'" in out
        assert "Results    none" in out

    def test_setup_site_builds_the_demo_model_and_rule_once(self, data_dir, capsys):
        from django.core.management import call_command

        call_command("setup_site")
        call_command("setup_site")
        out = capsys.readouterr().out
        assert "routing rule 'Demo: CT head to the demonstration model' added" in out
        assert "routing rules exist, demo rule not added" in out
        assert AIModel.objects.get().demonstration
        assert RoutingRule.objects.count() == 1
        assert (data_dir / AIModel.objects.get().file).is_file()
        from django_q.models import Schedule

        assert Schedule.objects.filter(func="results.tasks.sweep_inference").count() == 1

    def test_setup_site_moves_the_demo_rule_to_a_new_demo_version_and_keeps_the_old(self, data_dir, tmp_path):
        """Results name the version that made them: an upgrade adds a version, it never rewrites one."""
        import hashlib

        import yaml

        from results.inference.demo_model import NAME, RULE_NAME, VERSION, demo_model_write
        from results.inference.registry import model_register

        # A site set up by the previous release: the demo rule runs demo version 1.0, with a result.
        manifest_path, manifest = demo_model_write(directory=tmp_path / "old")
        old_file = tmp_path / "old" / manifest["file"]
        old_model = onnx.load(old_file)
        old_model.doc_string = "version 1.0"  # another file, as 1.0 was
        onnx.save(old_model, old_file)
        manifest.update(version="1.0", sha256=hashlib.sha256(old_file.read_bytes()).hexdigest())
        manifest_path.write_text(yaml.safe_dump(manifest))
        old, _ = model_register(manifest_path=manifest_path)
        rule = RoutingRule.objects.create(name=RULE_NAME, position=1000)
        rule.ai_models.add(old)
        study = ingest(demo(tmp_path, seed=90, slices=10, size=64).paths)
        InferenceResult.objects.create(
            study=study, model=old, model_name=NAME, model_version="1.0", model_sha256=old.sha256, status="succeeded"
        )
        line = ensure_demo_setup()
        assert "now runs it instead of 1.0" in line
        new = AIModel.objects.get(version=VERSION)
        assert list(rule.ai_models.all()) == [new]
        result = InferenceResult.objects.get()
        assert (result.model, result.model_version, result.model_sha256) == (old, "1.0", old.sha256)
        assert ensure_demo_setup().endswith("routing rules exist, demo rule not added")


class TestUnreadableFiles:
    def test_a_truncated_file_is_unreadable_not_a_crash(self, demo_site, tmp_path):
        written = demo(tmp_path, slices=12, size=64, seed=73)
        study = ingest(written.paths)
        # Cut short on disk after it was stored (the listener refuses a cut-short instance).
        uid = pydicom.dcmread(written.paths[5], stop_before_pixels=True).SOPInstanceUID
        stored = Path(settings.DATA_DIR) / study.instances.get(sop_instance_uid=uid).path
        stored.write_bytes(stored.read_bytes()[:-1000])
        process_study(study.pk)
        result = InferenceResult.objects.get(study=study)
        assert result.failure_reason == FailureReason.UNREADABLE_PIXELS


class TestRerun:
    def test_a_manual_rerun_supersedes_and_is_refused_while_work_is_in_flight(self, demo_site, tmp_path, capsys):
        from django.core.management import CommandError, call_command

        study = ingest(demo(tmp_path, seed=80, slices=10, size=64).paths)
        with pytest.raises(CommandError, match="is complete; a re-run starts from"):
            call_command("rerun_inference", study.study_instance_uid)
        process_study(study.pk)
        first = InferenceResult.objects.get()
        call_command("rerun_inference", study.study_instance_uid)
        assert "queued" in capsys.readouterr().out
        study.refresh_from_db()
        assert study.state == StudyState.COMPLETE and study.events.last().kind == "rerun"
        process_study(study.pk)  # what the enqueued task does
        second = InferenceResult.objects.exclude(pk=first.pk).get()
        assert second.supersedes == first
        kinds = list(study.events.values_list("kind", flat=True))
        assert kinds[-5:] == ["inferred", "rerun", "routed", "inferring", "inferred"]
