"""Database rows for the tests, built straight through the models: staff users per role, studies
with their timeline, results, destinations and deliveries; and studies received the way the
listener stores them (`receive`, `inferred_study`).

Fixtures (registered in conftest): `users`, `pipeline` (a delivered and a failed study), `rule`,
and `plain_static_storage`, which the staff-UI test modules ask for with `usefixtures`.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, User
from django.utils import timezone

from pacslens.demo_study import demo_study_write
from results.models import (
    AIModel,
    Delivery,
    DeliveryAttempt,
    Destination,
    InferenceResult,
)
from routing.models import (
    ApplicationEntity,
    RoutingRule,
    Series,
    Study,
    StudyEvent,
    StudyState,
)
from routing.store.spool import instance_store
from tests.support.net import HeaderRecorder

PASSWORD = "correct horse battery staple"
ROLES = ("admin", "informaticist", "superuser", "nobody")
GROUP_OF_ROLE = {"admin": "PACS administrators", "informaticist": "Informaticists"}


@pytest.fixture
def plain_static_storage(settings, tmp_path):
    # The manifest storage needs collectstatic; tests serve static files from the finders.
    settings.STATIC_ROOT = tmp_path / "static"
    settings.STATIC_ROOT.mkdir()
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    # Real password hashing costs ~0.3 s per user; the tests create several per test.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def staff_groups_ensure() -> None:
    """The groups come from a data migration; a transactional test's flush (listener tests, browser
    tests) empties the tables, so tests that need them put them back the migration's way."""
    import importlib

    from django.apps import apps

    if Group.objects.filter(name__in=GROUP_OF_ROLE.values()).count() < len(GROUP_OF_ROLE):
        migration = importlib.import_module("routing.migrations.0004_audit_entry_staff_groups")
        migration.create_staff_groups(apps, None)
        importlib.import_module("results.migrations.0008_pacs_admins_see_failure_queue").grant_queue_view(apps, None)
        importlib.import_module("results.migrations.0012_alert_roles_default_rules").grant_permissions(apps, None)
        importlib.import_module("results.migrations.0016_webhook_permissions").grant_permissions(apps, None)


def make_user(role: str) -> User:
    staff_groups_ensure()
    if role == "superuser":
        return User.objects.create_superuser("root", "root@example.org", PASSWORD)
    user = User.objects.create_user(role, f"{role}@example.org", PASSWORD)
    if role in GROUP_OF_ROLE:
        user.groups.add(Group.objects.get(name=GROUP_OF_ROLE[role]))
    return user


@pytest.fixture
def users(db) -> dict[str, User]:
    return {role: make_user(role) for role in ROLES}


def make_study(
    *,
    accession: str = "ACC100",
    state: str = StudyState.DELIVERED,
    patient_name: str = "ZZTEST^UI",
    modality: str = "CT",
    calling: str = "MODALITY1",
    minutes_ago: int = 10,
) -> Study:
    start = timezone.now() - timedelta(minutes=minutes_ago)
    study = Study.objects.create(
        study_instance_uid=f"1.2.826.0.1.3680043.8.498.{Study.objects.count() + 1}{int(start.timestamp())}",
        state=state,
        patient_id="ZZ0001",
        patient_name=patient_name,
        accession_number=accession,
        study_description="CT HEAD",
        modalities=modality,
        calling_ae_title=calling,
        called_ae_title="PACSLENS",
        first_received_at=start,
        last_received_at=start,
        state_changed_at=start + timedelta(seconds=40),
    )
    Series.objects.create(
        study=study,
        series_instance_uid=study.study_instance_uid + ".1",
        modality=modality,
        body_part_examined="HEAD",
        series_number=1,
    )
    steps = [
        ("receiving", 0),
        ("complete", 20),
        ("routed", 21),
        ("inferring", 22),
        ("inferred", 30),
        ("delivering", 31),
    ]
    if state in (StudyState.DELIVERED, StudyState.FAILED):
        steps.append((state, 40))
    for to_state, seconds in steps:
        StudyEvent.objects.create(
            study=study,
            at=start + timedelta(seconds=seconds),
            kind=to_state,
            to_state=to_state,
            detail=f"step {to_state}",
        )
    return study


def make_model(*, demonstration: bool = True) -> AIModel:
    model, _ = AIModel.objects.get_or_create(
        name="demo-bleed",
        version="1.0",
        defaults={
            "file": "models/demo.onnx",
            "sha256": "ab" * 32,
            "demonstration": demonstration,
            "intended_use": "Demonstration only",
            "manifest": {"output": {"threshold": 0.5}, "accepts": {"modalities": ["CT"]}},
        },
    )
    return model


def make_result(study: Study, *, score: float = 0.83, supersedes: InferenceResult | None = None) -> InferenceResult:
    model = make_model()
    return InferenceResult.objects.create(
        study=study,
        model=model,
        model_name=model.name,
        model_version=model.version,
        model_sha256=model.sha256,
        status="succeeded",
        score=score,
        flagged=score >= 0.5,
        label="bleed" if score >= 0.5 else "",
        supersedes=supersedes,
        series=study.series.first(),
        instance_count=3,
    )


def make_destination(name: str = "ris", port: int = 2575, **overrides) -> Destination:
    values = dict(
        name=name,
        kind="hl7",
        host="127.0.0.1",
        port=port,
        hl7_message_type="ORU^R01",
        timeout_seconds=2,
        backoff_base_seconds=1,
        backoff_cap_seconds=5,
    )
    values.update(overrides)
    return Destination.objects.create(**values)


def make_failed_delivery(
    study: Study, result: InferenceResult, destination: Destination, error_class: str = "permanent"
) -> Delivery:
    delivery = Delivery.objects.create(
        result=result,
        destination=destination,
        study=study,
        kind=destination.kind,
        idempotency_key=f"PL{result.pk}D{destination.pk}",
        state="failed",
        attempts=1,
        last_error="RIS answered AE: application error",
        last_error_class=error_class,
    )
    now = timezone.now()
    DeliveryAttempt.objects.create(
        delivery=delivery,
        number=1,
        worker="test:1",
        started_at=now - timedelta(seconds=1),
        ended_at=now,
        outcome=error_class,
        code="AE",
        message="RIS answered AE",
    )
    return delivery


@pytest.fixture
def pipeline(db) -> dict:
    """One delivered study with a superseded and a current result, one failed study with a failed delivery."""
    entity = ApplicationEntity.objects.create(ae_title="MODALITY1", host="127.0.0.1", port=104)
    rule = RoutingRule.objects.create(name="CT head")
    destination = make_destination()
    destination.rules.add(rule)
    done = make_study(accession="ACC100")
    old = make_result(done, score=0.2)
    make_result(done, score=0.9, supersedes=old)
    failed = make_study(accession="ACC200", state=StudyState.FAILED, patient_name="ZZTEST^<b>ESCAPE</b>")
    failed_result = make_result(failed)
    delivery = make_failed_delivery(failed, failed_result, destination)
    return {
        "done": done,
        "failed": failed,
        "delivery": delivery,
        "destination": destination,
        "rule": rule,
        "entity": entity,
    }


@pytest.fixture
def rule():
    return RoutingRule.objects.create(name="CT head")


def receive(data_dir, ds, association=None, calling="MODALITY1"):
    """Store `ds` as the listener would (through a temp file in `incoming/`); returns its study."""
    path = data_dir / "incoming" / f"{ds.SOPInstanceUID}.tmp"
    path.parent.mkdir(exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    result = instance_store(
        temp_path=path,
        request_sop_class_uid=ds.SOPClassUID,
        request_sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        calling_ae_title=calling,
        association_id=association.pk if association else None,
        sender_id=ApplicationEntity.objects.filter(ae_title=calling).values_list("pk", flat=True).first(),
    )
    assert result.ok, result.message
    return Study.objects.get(pk=result.study_id)


def inferred_study(data_dir, *, slices=3, flagged=True) -> tuple[Study, InferenceResult]:
    """A study received (`slices` demo slices, with a lesion when `flagged`) and inferred."""
    for ds in demo_study_write(outdir=None, slices=slices, size=16, lesion=flagged).datasets:
        study = receive(data_dir, ds)
    model, _ = AIModel.objects.get_or_create(
        name="demo",
        version="1",
        defaults={"file": "x.onnx", "sha256": "0" * 64, "manifest": {"output": {"threshold": 0.5}}},
    )
    Study.objects.filter(pk=study.pk).update(state=StudyState.INFERRED)
    study.refresh_from_db()
    result = InferenceResult.objects.create(
        study=study,
        model=model,
        model_name="demo",
        model_version="1",
        model_sha256="0" * 64,
        status="succeeded",
        score=0.83 if flagged else 0.1,
        flagged=flagged,
        series=study.series.get(),
        series_instance_uid=ds.SeriesInstanceUID,
        instance_count=slices,
    )
    return study, result


def hl7_destination(rule, port, **overrides) -> Destination:
    """A RIS on `port` that `rule` routes to."""
    destination = make_destination(port=port, **overrides)
    destination.full_clean()
    destination.rules.add(rule)
    return destination


def dicom_destination(rule, port, name="pacs", ae_title="STORESCP", **overrides) -> Destination:
    ae = ApplicationEntity.objects.create(ae_title=ae_title, host="127.0.0.1", port=port, receives_results=True)
    destination = Destination.objects.create(
        name=name, kind="dicom", application_entity=ae, timeout_seconds=3, **overrides
    )
    destination.full_clean()
    destination.rules.add(rule)
    return destination


@pytest.fixture
def admin(client, users):
    """The test client logged in as the PACS administrator."""
    client.force_login(users["admin"])
    return client


@pytest.fixture
def recorder() -> Iterator[HeaderRecorder]:
    """An HTTP server that records the headers it is sent (where would a secret go?)."""
    server = HeaderRecorder()
    yield server
    server.stop()
