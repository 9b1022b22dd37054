"""Shadow mode (rules whose models run without delivering, a new version beside the live one)
and score monitoring (distribution and share flagged per day/week, agreement, charts, /metrics)."""

from __future__ import annotations

import datetime as dt

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from pacslens.demo_study import demo_study_write
from pacslens.site_config.routing_rules import RoutingRulesSection
from pacslens.staff.forms import RoutingRuleForm
from results.deliver.ledger import study_redeliver
from results.inference.demo_model import ensure_demo_setup
from results.inference.runtime import sessions_clear
from results.models import AIModel, Delivery, InferenceResult
from results.monitoring import ModelKey, flagged_share, model_agreement, score_distribution
from results.tasks import infer_pending
from routing.models import RoutingRule, Study, StudyState
from routing.tasks import route_study
from tests.support.factories import hl7_destination, make_model, make_study, receive

pytestmark = pytest.mark.django_db


@pytest.fixture
def demo_rule(data_dir) -> RoutingRule:
    sessions_clear()
    ensure_demo_setup()
    return RoutingRule.objects.get()


def shadow_version(live: AIModel, *, version: str = "1.1-trial", threshold: float = 1.01) -> AIModel:
    """The same ONNX file registered as another version; threshold > 1 never flags."""
    manifest = {**live.manifest, "version": version, "output": {**live.manifest["output"], "threshold": threshold}}
    return AIModel.objects.create(
        name=live.name, version=version, file=live.file, sha256=live.sha256, manifest=manifest, demonstration=True
    )


def inferred(data_dir, *, lesion: bool, seed: int) -> Study:
    for ds in demo_study_write(outdir=None, slices=16, size=96, lesion=lesion, seed=seed).datasets:
        study = receive(data_dir, ds)
    study.transition(StudyState.COMPLETE, from_states=[StudyState.RECEIVING], detail="test")
    route_study(study.pk)
    infer_pending()
    study.refresh_from_db()
    return study


class TestShadowRule:
    def test_a_shadow_rule_records_results_and_delivers_nothing(self, demo_rule, data_dir, mllp):
        demo_rule.shadow = True
        demo_rule.save()
        hl7_destination(demo_rule, mllp.port)
        study = inferred(data_dir, lesion=True, seed=21)
        result = InferenceResult.objects.get(study=study)
        assert result.shadow and result.flagged
        assert study.state == StudyState.INFERRED
        assert not Delivery.objects.exists()
        assert "(shadow)" in study.events.get(kind="inferred").detail
        # A staff re-delivery does not send it either.
        assert study_redeliver(study=study, actor="test") == (0, [])
        assert not Delivery.objects.exists()


class TestSideBySide:
    def test_a_new_version_runs_in_shadow_beside_the_live_one(self, demo_rule, data_dir, mllp):
        live = demo_rule.ai_models.get()
        trial = shadow_version(live)
        demo_rule.shadow_ai_models.add(trial)
        hl7_destination(demo_rule, mllp.port)
        flagged_study = inferred(data_dir, lesion=True, seed=22)
        clean_study = inferred(data_dir, lesion=False, seed=23)
        for study in (flagged_study, clean_study):
            results = {r.model_version: r for r in InferenceResult.objects.current().filter(study=study)}
            assert set(results) == {live.version, trial.version}  # neither supersedes the other
            assert not results[live.version].shadow and results[trial.version].shadow
            # Only the live result is delivered.
            assert list(Delivery.objects.filter(study=study).values_list("result", flat=True)) == [
                results[live.version].pk
            ]
        [agreement] = model_agreement()
        assert agreement.live == ModelKey(live.name, live.version, False)
        assert agreement.shadow == ModelKey(trial.name, trial.version, True)
        assert (agreement.both, agreement.live_only, agreement.shadow_only, agreement.neither) == (0, 1, 0, 1)
        assert agreement.agreement == 0.5

    def test_a_failing_shadow_version_does_not_fail_the_study(self, demo_rule, data_dir):
        trial = AIModel.objects.create(
            name="broken-trial",
            version="0.1",
            file="models/missing.onnx",
            sha256="0" * 64,
            manifest=demo_rule.ai_models.get().manifest,
        )
        demo_rule.shadow_ai_models.add(trial)
        study = inferred(data_dir, lesion=False, seed=24)
        assert study.state == StudyState.INFERRED
        assert InferenceResult.objects.get(study=study, model=trial).status == "failed"

    def test_a_model_is_live_or_shadow_on_a_rule_not_both(self, demo_rule):
        model = demo_rule.ai_models.get()
        form = RoutingRuleForm(
            data={
                "name": "x",
                "priority": demo_rule.priority,
                "ai_models": [model.pk],
                "shadow_ai_models": [model.pk],
            }
        )
        assert not form.is_valid()
        assert "live or in shadow" in form.errors["shadow_ai_models"][0]

    def test_shadow_settings_round_trip_through_the_site_yaml(self, demo_rule):
        live = demo_rule.ai_models.get()
        trial = shadow_version(live)
        demo_rule.shadow_ai_models.add(trial)
        section = RoutingRulesSection()
        [entry] = section.export()
        assert entry["shadow"] is False
        assert entry["shadow_models"] == [{"name": trial.name, "version": trial.version}]
        entry["shadow"] = True
        assert section.validate([entry]) == []
        section.apply([entry], prune=False)
        demo_rule.refresh_from_db()
        assert demo_rule.shadow and list(demo_rule.shadow_ai_models.all()) == [trial]
        entry["shadow_models"].append({"name": live.name, "version": live.version})
        assert any("also in 'models'" in p for p in section.validate([entry]))


def scored(study: Study, model: AIModel, *, score: float, days_ago: float, shadow: bool = False) -> InferenceResult:
    return InferenceResult.objects.create(
        study=study,
        model=model,
        model_name=model.name,
        model_version=model.version,
        model_sha256=model.sha256,
        status="succeeded",
        score=score,
        flagged=score >= 0.5,
        shadow=shadow,
        created_at=timezone.now() - dt.timedelta(days=days_ago),
    )


@pytest.fixture
def history(db):
    """demo-bleed 1.0: today 3 results (1 flagged), 3 days ago 2 (2 flagged); one shadow result."""
    model = make_model()
    study = make_study()
    for score, days in ((0.05, 0), (0.15, 0), (0.95, 0), (0.7, 3), (0.8, 3)):
        scored(make_study(accession=f"A{score}"), model, score=score, days_ago=days)
    scored(study, model, score=0.6, days_ago=0, shadow=True)
    return model


class TestMonitoring:
    def test_distribution_per_day_and_week(self, history):
        days = score_distribution(period="day")
        live = days[ModelKey("demo-bleed", "1.0", False)]
        assert [(p.count, p.flagged) for p in live] == [(2, 2), (3, 1)]
        today = live[-1]
        assert today.start == timezone.localdate()
        assert today.histogram == [1, 1, 0, 0, 0, 0, 0, 0, 0, 1]
        assert today.flagged_share == pytest.approx(1 / 3)
        assert 0.1 <= today.quantile(0.5) <= 0.2
        assert days[ModelKey("demo-bleed", "1.0", True)][0].count == 1
        weeks = score_distribution(period="week")
        assert sum(p.count for p in weeks[ModelKey("demo-bleed", "1.0", False)]) == 5
        with pytest.raises(ValueError):
            score_distribution(period="month")

    def test_flagged_share_over_a_window(self, history):
        day = flagged_share(model_name="demo-bleed", since=timezone.now() - dt.timedelta(days=1))
        assert (day.count, day.flagged) == (3, 1)
        week = flagged_share(model_name="demo-bleed", model_version="1.0", since=timezone.now() - dt.timedelta(days=7))
        assert (week.count, week.flagged, week.share) == (5, 3, 0.6)
        shadow = flagged_share(model_name="demo-bleed", since=timezone.now() - dt.timedelta(days=1), shadow=True)
        assert (shadow.count, shadow.flagged) == (1, 1)
        assert flagged_share(model_name="nothing", since=timezone.now()).share is None

    def test_metrics_series(self, history, data_dir):
        response = Client().get("/metrics", REMOTE_ADDR="127.0.0.1")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.content.decode())
            for s in family.samples
        }
        live = (("model", "demo-bleed"), ("shadow", "false"), ("version", "1.0"))
        assert samples[("pacslens_model_score_count", live)] == 5
        assert samples[("pacslens_model_score_bucket", tuple(sorted((*live, ("le", "0.2")))))] == 2
        assert samples[("pacslens_model_flagged_total", live)] == 3
        assert samples[("pacslens_model_flagged_share", tuple(sorted((*live, ("window", "1d")))))] == pytest.approx(
            1 / 3
        )
        assert samples[("pacslens_model_scored_results", tuple(sorted((*live, ("window", "7d")))))] == 5
        shadow = (("model", "demo-bleed"), ("shadow", "true"), ("version", "1.0"))
        assert samples[("pacslens_model_flagged_total", shadow)] == 1


@pytest.mark.usefixtures("plain_static_storage")
class TestPages:
    def test_models_page_charts_per_version_and_period(self, client, users, history):
        client.force_login(users["superuser"])
        page = client.get("/models/").content.decode()
        assert page.count("<svg") == 2  # live and shadow apart
        assert "demo-bleed 1.0 (shadow)" in page
        assert f"{timezone.localdate():%Y-%m-%d}: 3 results, 1 flagged (33%)" in page
        assert 'class="flagged-share"' in page and 'class="score-median"' in page
        weekly = client.get("/models/?period=week").content.decode()
        assert "last 12 weeks" in weekly
        # The htmx fragment is the table only.
        assert "<svg" not in client.get("/models/", HTTP_HX_REQUEST="true").content.decode()

    def test_triage_audit_marks_shadow_results_and_charts_the_chosen_model(self, client, users, history):
        client.force_login(users["superuser"])
        page = client.get(f"/audit/triage/?model={history.pk}").content.decode()
        assert "shadow-badge" in page and page.count("<svg") == 2
        csv = b"".join(client.get("/audit/triage.csv").streaming_content).decode()
        assert ",shadow," in csv.splitlines()[0] and ",yes," in csv
        assert "shadow-badge" in client.get("/audit/triage/", HTTP_HX_REQUEST="true").content.decode()

    def test_agreement_table_on_the_models_page(self, client, users, history):
        other = AIModel.objects.create(
            name="demo-bleed", version="2.0", file="m.onnx", sha256="cd" * 32, manifest=history.manifest
        )
        study = InferenceResult.objects.filter(shadow=False, flagged=True).first().study
        scored(study, other, score=0.2, days_ago=0, shadow=True)
        client.force_login(users["superuser"])
        page = client.get("/models/").content.decode()
        assert 'id="model-agreement"' in page
        assert "demo-bleed 2.0 (shadow)" in page

    def test_rule_list_marks_shadow_mode_and_shadow_models(self, client, users, demo_rule):
        trial = shadow_version(demo_rule.ai_models.get())
        demo_rule.shadow_ai_models.add(trial)
        client.force_login(users["superuser"])
        page = client.get("/rules/").content.decode()
        assert f"{trial} <span" in page and "shadow mode" not in page
        demo_rule.shadow = True
        demo_rule.save()
        assert "shadow mode" in client.get("/rules/").content.decode()
