"""Destination secrets encrypted at rest: widen the column (a Fernet token is longer than its
plaintext), encrypt what is stored, then hand the column to SealedSecretField."""

from django.db import migrations, models

import results.models.sealed


def seal_existing(apps, schema_editor):
    # The historical field here is a plain TextField: values are read and written as they are.
    Destination = apps.get_model("results", "Destination")
    for pk, secret in Destination.objects.exclude(secret="").values_list("pk", "secret"):
        Destination.objects.filter(pk=pk).update(secret=results.models.sealed.seal(secret))


def unseal_existing(apps, schema_editor):
    Destination = apps.get_model("results", "Destination")
    for pk, secret in Destination.objects.exclude(secret="").values_list("pk", "secret"):
        plaintext = results.models.sealed.unseal(secret)
        if isinstance(plaintext, results.models.sealed.UnreadableSecret):
            raise RuntimeError(f"destination {pk}: its secret cannot be decrypted with the configured keys")
        Destination.objects.filter(pk=pk).update(secret=plaintext)


class Migration(migrations.Migration):
    dependencies = [
        ("results", "0004_result_identifiers"),
    ]

    operations = [
        migrations.AlterField(model_name="destination", name="secret", field=models.TextField(blank=True)),
        migrations.RunPython(seal_existing, unseal_existing),
        migrations.AlterField(
            model_name="destination",
            name="secret",
            field=results.models.sealed.SealedSecretField(blank=True),
        ),
    ]
