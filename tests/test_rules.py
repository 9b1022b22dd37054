"""Routing rules: every operator, per-series matching, order and first match, explain, routing."""

from __future__ import annotations

import time

import pytest
import re2
from django.core.exceptions import ValidationError
from pydicom.uid import CTImageStorage, MRImageStorage

from results.models import AIModel
from routing.models import (
    Instance,
    Operator,
    Priority,
    RoutingDecision,
    RoutingRule,
    RuleCondition,
    Series,
    Study,
    StudyState,
)
from routing.models.rules import rule_regex
from routing.rules import condition_evaluate, study_explain_routing, study_route

pytestmark = pytest.mark.django_db


def make_study(*, calling="CT01", called="PACSLENS", description="CT HEAD WO", series=(("CT", "HEAD", "Axial"),)):
    study = Study.objects.create(
        study_instance_uid=f"1.2.826.0.1.{Study.objects.count() + 1}",
        state=StudyState.COMPLETE,
        calling_ae_title=calling,
        called_ae_title=called,
        study_description=description,
    )
    for number, (modality, body_part, series_description) in enumerate(series, start=1):
        s = Series.objects.create(
            study=study,
            series_instance_uid=f"{study.study_instance_uid}.{number}",
            modality=modality,
            body_part_examined=body_part,
            series_description=series_description,
            series_number=number,
        )
        Instance.objects.create(
            study=study,
            series=s,
            sop_instance_uid=f"{s.series_instance_uid}.1",
            sop_class_uid=CTImageStorage if modality == "CT" else MRImageStorage,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            size=1,
        )
    return study


def make_model(name="triage"):
    return AIModel.objects.create(
        name=name, version="1", file=f"models/{name}.onnx", sha256="0" * 64, manifest={}, intended_use="test"
    )


def make_rule(name, *conditions, position=10, priority=Priority.ROUTINE, stop=True, enabled=True, model=None):
    rule = RoutingRule.objects.create(
        name=name, position=position, priority=priority, stop_at_first_match=stop, enabled=enabled
    )
    for index, (attribute, operator, value) in enumerate(conditions):
        rule.conditions.create(attribute=attribute, operator=operator, value=value, position=index)
    rule.ai_models.add(model or make_model(f"model-{name}"))
    return rule


def verdict(operator, value, seen):
    condition = RuleCondition(attribute="Modality", operator=operator, value=value)
    return condition_evaluate(condition=condition, seen=seen).holds


class TestOperators:
    def test_equals_is_case_insensitive_and_ignores_padding(self):
        assert verdict(Operator.EQUALS, "ct", ["CT"])
        assert verdict(Operator.EQUALS, "HEAD ", ["head"])
        assert not verdict(Operator.EQUALS, "CT", ["CTA"])
        assert not verdict(Operator.EQUALS, "CT", [])

    def test_one_of_uses_backslash_separated_values(self):
        assert verdict(Operator.ONE_OF, "HEAD\\BRAIN", ["brain"])
        assert not verdict(Operator.ONE_OF, "HEAD\\BRAIN", ["CHEST"])

    def test_contains(self):
        assert verdict(Operator.CONTAINS, "head", ["CT HEAD WO CONTRAST"])
        assert not verdict(Operator.CONTAINS, "chest", ["CT HEAD WO CONTRAST"])

    def test_regex_searches_case_insensitively(self):
        assert verdict(Operator.REGEX, r"^ct\b.*(head|brain)", ["CT Brain perfusion"])
        assert not verdict(Operator.REGEX, r"^head$", ["CT HEAD"])

    def test_regex_is_re2_and_a_catastrophic_pattern_stays_linear(self):
        # (a+)+$ backtracks exponentially in Python's re; the value is what a sender controls.
        assert isinstance(rule_regex("(a+)+$"), re2._Regexp)
        value = "a" * 100_000 + "b"
        started = time.perf_counter()
        assert not verdict(Operator.REGEX, "(a+)+$", [value])
        assert verdict(Operator.REGEX, "(a+)+b$", [value])
        print(f"RE2: (a+)+$ against {len(value)} characters in {time.perf_counter() - started:.4f} s")

    def test_present_and_absent(self):
        assert verdict(Operator.PRESENT, "", ["x"])
        assert not verdict(Operator.PRESENT, "", [""])
        assert verdict(Operator.ABSENT, "", [])
        assert verdict(Operator.ABSENT, "", [""])
        assert not verdict(Operator.ABSENT, "", ["HEAD"])

    def test_multi_valued_attributes_hold_when_any_value_does(self):
        assert verdict(Operator.EQUALS, "AXIAL", ["ORIGINAL", "PRIMARY", "AXIAL"])


class TestValidation:
    def test_an_invalid_regex_is_refused_at_save(self):
        rule = RoutingRule.objects.create(name="r")
        with pytest.raises(ValidationError) as excinfo:
            rule.conditions.create(attribute="StudyDescription", operator=Operator.REGEX, value="head(")
        assert "invalid regular expression" in str(excinfo.value)
        assert not RuleCondition.objects.exists()

    @pytest.mark.parametrize("pattern", [r"(head)\s+\1", r"head(?!neck)", r"(?<=CT )head"])
    def test_backreferences_and_lookaround_are_refused_with_the_reason(self, pattern):
        rule = RoutingRule.objects.create(name="r")
        with pytest.raises(ValidationError) as excinfo:
            rule.conditions.create(attribute="StudyDescription", operator=Operator.REGEX, value=pattern)
        assert "RE2 runs in linear time" in str(excinfo.value) and "lookaround" in str(excinfo.value)

    def test_unknown_keyword_operator_and_missing_value(self):
        rule = RoutingRule.objects.create(name="r")
        for attribute, operator, value, field in [
            ("Modaliti", Operator.EQUALS, "CT", "attribute"),
            ("Modality", "startswith", "C", "operator"),
            ("Modality", Operator.EQUALS, " ", "value"),
            ("Modality", Operator.PRESENT, "CT", "value"),
        ]:
            with pytest.raises(ValidationError) as excinfo:
                RuleCondition(rule=rule, attribute=attribute, operator=operator, value=value).save()
            assert field in excinfo.value.message_dict

    def test_pseudo_keywords_and_any_dicom_keyword_are_accepted(self):
        rule = RoutingRule.objects.create(name="r")
        for attribute in ("CallingAETitle", "CalledAETitle", "ImageType", "SOPClassUID"):
            RuleCondition(rule=rule, attribute=attribute, operator=Operator.PRESENT).save()


class TestMatching:
    def test_all_conditions_must_hold_on_one_series(self):
        # CT chest + MR head: "CT and HEAD" must not match across two series.
        study = make_study(series=(("CT", "CHEST", "Lung"), ("MR", "HEAD", "T1")))
        make_rule("ct head", ("Modality", Operator.EQUALS, "CT"), ("BodyPartExamined", Operator.EQUALS, "HEAD"))
        explanation = study_explain_routing(study=study)
        assert explanation.matched_rules == []
        study = make_study(series=(("CT", "CHEST", "Lung"), ("CT", "HEAD", "Axial")))
        explanation = study_explain_routing(study=study)
        assert [r.name for r in explanation.matched_rules] == ["ct head"]
        assert explanation.verdicts[0].series_instance_uid == f"{study.study_instance_uid}.2"

    def test_study_level_attributes_and_sop_class(self):
        study = make_study(calling="CT_ROOM_2", called="AI_GW", description="CT HEAD WO")
        make_rule(
            "all",
            ("CallingAETitle", Operator.REGEX, r"^ct_room_\d$"),
            ("CalledAETitle", Operator.EQUALS, "ai_gw"),
            ("StudyDescription", Operator.CONTAINS, "head"),
            ("SeriesDescription", Operator.EQUALS, "axial"),
            ("SOPClassUID", Operator.EQUALS, CTImageStorage),
        )
        assert len(study_explain_routing(study=study).matched_rules) == 1

    def test_order_and_first_match(self):
        study = make_study()
        make_rule("late", ("Modality", Operator.EQUALS, "CT"), position=20)
        make_rule("early", ("Modality", Operator.EQUALS, "CT"), position=10)
        explanation = study_explain_routing(study=study)
        assert [r.name for r in explanation.matched_rules] == ["early"]
        assert "not reached" in explanation.verdicts[1].skipped
        RoutingRule.objects.filter(name="early").update(stop_at_first_match=False)
        assert [r.name for r in study_explain_routing(study=study).matched_rules] == ["early", "late"]

    def test_disabled_rules_are_explained_but_never_match(self):
        study = make_study()
        make_rule("off", ("Modality", Operator.EQUALS, "CT"), enabled=False)
        explanation = study_explain_routing(study=study)
        assert explanation.verdicts[0].matched and explanation.verdicts[0].skipped == "disabled"
        assert explanation.matched_rules == []

    def test_header_keyword_is_read_from_the_first_instance(self, data_dir):
        from pathlib import Path

        from pacslens.demo_study import demo_study_write

        demo = demo_study_write(outdir=data_dir / "demo", slices=2, size=32, seed=1)
        study = make_study()
        for instance in Instance.objects.filter(study=study):
            instance.path = str(Path(demo.paths[0]).relative_to(data_dir))
            instance.save()
        make_rule("kernel", ("ConvolutionKernel", Operator.EQUALS, "h30S"), ("Manufacturer", Operator.PRESENT, ""))
        assert len(study_explain_routing(study=study).matched_rules) == 1


class TestExplain:
    def test_each_condition_reports_its_verdict_and_what_it_saw(self):
        study = make_study(series=(("CT", "CHEST", "Lung"),))
        make_rule("ct head", ("Modality", Operator.EQUALS, "CT"), ("BodyPartExamined", Operator.ONE_OF, "HEAD\\BRAIN"))
        [verdict] = study_explain_routing(study=study).verdicts
        assert not verdict.matched
        assert [(c.holds, c.seen) for c in verdict.conditions] == [(True, ["CT"]), (False, ["CHEST"])]
        assert "BodyPartExamined is one of 'HEAD\\BRAIN': no (saw 'CHEST')" in study_explain_routing(study=study).reason


class TestRoute:
    def test_a_match_routes_with_models_and_priority(self):
        study = make_study()
        model = make_model()
        make_rule("stat heads", ("Modality", Operator.EQUALS, "CT"), priority=Priority.STAT, model=model)
        decision = study_route(study=study)
        study.refresh_from_db()
        assert study.state == StudyState.ROUTED
        assert study.priority == Priority.STAT
        assert list(decision.ai_models.all()) == [model]
        assert decision.matched_rules == [{"id": RoutingRule.objects.get().pk, "name": "stat heads"}]
        assert study.events.last().to_state == StudyState.ROUTED
        assert "stat heads" in study.events.last().detail

    def test_no_match_is_ignored_with_the_reason(self):
        study = make_study(series=(("MR", "HEAD", "T1"),))
        make_rule("ct only", ("Modality", Operator.EQUALS, "CT"))
        decision = study_route(study=study)
        study.refresh_from_db()
        assert study.state == StudyState.IGNORED
        assert decision.ignored
        assert "no rule matched" in decision.reason and "saw 'MR'" in decision.reason
        assert "no rule matched" in study.events.last().detail

    def test_no_rules_at_all(self):
        study = make_study()
        assert "no enabled routing rules" in study_route(study=study).reason

    def test_a_matching_rule_whose_models_are_disabled_ignores_the_study(self):
        study = make_study()
        model = make_model()
        model.enabled = False
        model.save()
        make_rule("r", ("Modality", Operator.EQUALS, "CT"), model=model)
        study_route(study=study)
        study.refresh_from_db()
        assert study.state == StudyState.IGNORED
        assert "none of their models is enabled" in RoutingDecision.objects.get().reason

    def test_routing_twice_is_harmless(self):
        study = make_study()
        make_rule("r", ("Modality", Operator.EQUALS, "CT"))
        stale = Study.objects.get(pk=study.pk)
        assert study_route(study=study) is not None
        assert study_route(study=stale) is None  # another worker got there first
        assert RoutingDecision.objects.count() == 1

    def test_routing_never_demotes_a_stat_study(self):
        study = make_study()
        Study.objects.filter(pk=study.pk).update(priority=Priority.STAT)
        study.refresh_from_db()
        make_rule("routine", ("Modality", Operator.EQUALS, "CT"), priority=Priority.ROUTINE)
        study_route(study=study)
        study.refresh_from_db()
        assert study.priority == Priority.STAT


class TestYamlConfig:
    @pytest.fixture
    def site(self, data_dir):
        from results.inference.demo_model import ensure_demo_setup

        ensure_demo_setup()
        model = AIModel.objects.get()
        rule = make_rule(
            "stat trauma",
            ("CallingAETitle", Operator.REGEX, r"^ER_"),
            ("BodyPartExamined", Operator.ONE_OF, "HEAD\\BRAIN"),
            ("ContrastBolusAgent", Operator.ABSENT, ""),
            position=5,
            priority=Priority.STAT,
            stop=False,
            model=model,
        )
        rule.description = "ER head CTs jump the queue"
        rule.save()
        return model

    def test_round_trip_is_exact(self, site):
        import yaml

        from pacslens.site_config.document import config_export, config_import

        first = config_export()
        document = yaml.safe_load(first)
        assert [r["name"] for r in document["routing_rules"]] == [
            "stat trauma",
            "Demo: CT head to the demonstration model",
        ]
        stat = document["routing_rules"][0]
        assert stat["priority"] == "stat" and stat["stop_at_first_match"] is False
        assert stat["models"] == [{"name": "demo-hyperdense-head-ct", "version": "2.0"}]
        assert stat["conditions"] == [
            {"attribute": "CallingAETitle", "operator": "regex", "value": "^ER_"},
            {"attribute": "BodyPartExamined", "operator": "one_of", "value": ["HEAD", "BRAIN"]},
            {"attribute": "ContrastBolusAgent", "operator": "absent"},
        ]
        assert document["models"][0]["demonstration"] is True
        RoutingRule.objects.all().delete()
        AIModel.objects.all().delete()
        summary = config_import(first)
        assert summary["models"]["created"] == 1 and summary["routing_rules"]["created"] == 2
        assert config_export() == first
        assert config_import(first)["routing_rules"] == {"created": 0, "updated": 2, "deleted": 0}
        assert config_export() == first

    def test_import_updates_rules_and_prunes(self, site):
        import yaml

        from pacslens.site_config.document import config_export, config_import

        document = yaml.safe_load(config_export())
        document["routing_rules"] = [document["routing_rules"][0]]
        document["routing_rules"][0]["conditions"] = [{"attribute": "Modality", "operator": "equals", "value": "CT"}]
        document["models"][0]["enabled"] = False
        config_import(yaml.safe_dump(document, sort_keys=False), prune=True)
        rule = RoutingRule.objects.get()
        assert [str(c) for c in rule.conditions.all()] == ["Modality equals 'CT'"]
        assert AIModel.objects.get().enabled is False

    def test_every_bad_entry_is_named_and_nothing_changes(self, site):
        import yaml

        from pacslens.site_config.document import ConfigError, config_export, config_import

        before = config_export()
        document = yaml.safe_load(before)
        rule = document["routing_rules"][0]
        rule["priority"] = "urgent"
        rule["conditions"][0]["value"] = "^ER_("
        rule["models"] = [{"name": "nope", "version": "9"}]
        document["routing_rules"].append({"name": "new", "colour": "red"})
        document["models"][0]["output"]["threshold"] = 0.9  # same version, changed manifest
        document["models"].append({**document["models"][0], "version": "9.0", "file": "../../etc/passwd"})
        with pytest.raises(ConfigError) as excinfo:
            config_import(yaml.safe_dump(document, sort_keys=False))
        text = str(excinfo.value)
        assert "routing_rules[0] ('stat trauma'): field 'priority': must be stat or routine" in text
        assert "routing_rules[0] ('stat trauma'): field 'conditions[0].value': invalid regular expression" in text
        assert "routing_rules[0] ('stat trauma'): field 'models[0]': no model nope 9" in text
        assert "routing_rules[2] ('new'): unknown field(s) colour" in text
        assert "models[0] ('demo-hyperdense-head-ct' '2.0'): field 'version': this version is registered" in text
        assert "models[1] ('demo-hyperdense-head-ct' '9.0'): field 'file': must be a path under" in text
        assert config_export() == before

    def test_a_rule_may_name_a_model_added_by_the_same_file(self, site, data_dir):
        import yaml

        from pacslens.site_config.document import config_export, config_import

        document = yaml.safe_load(config_export())
        RoutingRule.objects.all().delete()
        AIModel.objects.all().delete()
        assert config_import(yaml.safe_dump(document, sort_keys=False))["models"]["created"] == 1
        assert RoutingRule.objects.get(name="stat trauma").ai_models.get().name == "demo-hyperdense-head-ct"


class TestPatientData:
    def test_the_reason_never_spells_out_patient_attributes(self, data_dir):
        from pathlib import Path

        from pacslens.demo_study import demo_study_write

        demo = demo_study_write(outdir=data_dir / "demo", slices=1, size=32, seed=2)
        study = make_study()
        Instance.objects.filter(study=study).update(path=str(Path(demo.paths[0]).relative_to(data_dir)))
        make_rule("vip", ("PatientName", Operator.REGEX, "^SMITH"))
        explanation = study_explain_routing(study=study)
        assert explanation.verdicts[0].conditions[0].seen[0].startswith("ZZDEMO^")  # the dry run, staff only
        assert "ZZDEMO" not in explanation.reason
        assert "patient data, not shown" in explanation.reason
