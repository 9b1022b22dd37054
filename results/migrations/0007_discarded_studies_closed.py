"""Studies settled as `delivered` although a delivery of their current results was discarded
(before the `closed` state existed) become `closed`, with a timeline event saying why."""

from django.db import migrations
from django.utils import timezone


def close_discarded(apps, schema_editor):
    Study = apps.get_model("routing", "Study")
    StudyEvent = apps.get_model("routing", "StudyEvent")
    Delivery = apps.get_model("results", "Delivery")
    study_ids = set(
        Delivery.objects.filter(
            state="discarded", study__state="delivered", result__superseded_by__isnull=True
        ).values_list("study_id", flat=True)
    )
    now = timezone.now()
    for study_id in sorted(study_ids):
        if Study.objects.filter(pk=study_id, state="delivered").update(state="closed", state_changed_at=now):
            StudyEvent.objects.create(
                study_id=study_id,
                at=now,
                kind="closed",
                from_state="delivered",
                to_state="closed",
                detail="upgrade: a discarded delivery is not a delivered one",
            )


class Migration(migrations.Migration):
    dependencies = [
        ("results", "0006_destination_last_test"),
        ("routing", "0007_study_state_closed"),
    ]

    operations = [migrations.RunPython(close_discarded, migrations.RunPython.noop)]
