"""Globally unique result identifiers (see results/identity.py).

Makes this database's installation identity, gives every existing result a random UUID, and
pins results that already have deliveries to the identifiers they were delivered with (their
SR UIDs and FHIR identifiers were derived from `pacslens-result-<id>`), so no re-send changes a
key. HL7 control ids are stored on the delivery rows already and stay as they are.
"""

import uuid

import django.utils.timezone
from django.db import migrations, models

import results.models.inference


def identities_create(apps, schema_editor):
    Installation = apps.get_model("results", "Installation")
    InferenceResult = apps.get_model("results", "InferenceResult")
    Delivery = apps.get_model("results", "Delivery")
    if not Installation.objects.exists():
        Installation.objects.create(uuid=uuid.uuid4(), singleton=True)
    delivered = set(Delivery.objects.values_list("result_id", flat=True))
    for pk in InferenceResult.objects.values_list("pk", flat=True).iterator():
        # A queryset update: InferenceResult.save() refuses edits (results are audit records).
        InferenceResult.objects.filter(pk=pk).update(
            uid=uuid.uuid4(), legacy_uid_seed=f"pacslens-result-{pk}" if pk in delivered else ""
        )
    # Legacy FHIR keys are urn:oid values under the URI system.
    Delivery.objects.filter(kind="fhir").update(identifier_system="urn:ietf:rfc:3986")


class Migration(migrations.Migration):

    dependencies = [
        ("results", "0003_evaluated_instances"),
    ]

    operations = [
        migrations.CreateModel(
            name="Installation",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("uuid", models.UUIDField(default=uuid.uuid4, editable=False, unique=True)),
                ("singleton", models.BooleanField(default=True, editable=False, unique=True)),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now, editable=False)),
            ],
        ),
        migrations.AddField(
            model_name="inferenceresult",
            name="uid",
            field=models.UUIDField(editable=False, null=True),
        ),
        migrations.AddField(
            model_name="inferenceresult",
            name="uid_root",
            field=models.CharField(
                blank=True, default=results.models.inference.uid_root_current, editable=False,
                help_text="DICOM org root in force when made; blank: 2.25", max_length=32,
            ),
        ),
        migrations.AddField(
            model_name="inferenceresult",
            name="legacy_uid_seed",
            field=models.CharField(
                blank=True, default="", editable=False, max_length=64,
                help_text="Results delivered before identities existed keep deriving their first identifiers",
            ),
        ),
        migrations.AddField(
            model_name="delivery",
            name="identifier_system",
            field=models.CharField(blank=True, default="", max_length=255),
        ),
        migrations.RunPython(identities_create, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="inferenceresult",
            name="uid",
            field=models.UUIDField(default=uuid.uuid4, editable=False, unique=True),
        ),
    ]
