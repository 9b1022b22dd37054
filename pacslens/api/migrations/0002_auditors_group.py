# The read-only role of the API (and of staff who only look): every view permission of the
# pipeline and the configuration, and the triage audit through the API.

from django.db import migrations

AUDITORS = "Auditors"
AUDITOR_PERMISSIONS = [
    "routing.view_study",
    "routing.view_applicationentity",
    "routing.view_routingrule",
    "routing.view_rulecondition",
    "routing.view_pollsource",
    "results.view_destination",
    "results.view_aimodel",
    "results.view_delivery",
    "results.view_inferenceresult",
    "api.view_triage_audit",
]


def create_auditors_group(apps, schema_editor):
    from django.contrib.auth.management import create_permissions

    # As routing 0004: permissions are normally created after migrate, the group needs them now.
    for app_config in apps.get_app_configs():
        models_module = getattr(app_config, "models_module", None)
        app_config.models_module = models_module or True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = models_module
    Permission = apps.get_model("auth", "Permission")
    Group = apps.get_model("auth", "Group")
    group, _ = Group.objects.get_or_create(name=AUDITORS)
    for perm in AUDITOR_PERMISSIONS:
        app_label, codename = perm.split(".")
        group.permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))


def remove_auditors_group(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name=AUDITORS).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("api", "0001_api_clients_and_tokens"),
        ("routing", "0004_audit_entry_staff_groups"),
        ("results", "0002_delivery"),
    ]

    operations = [migrations.RunPython(create_auditors_group, remove_auditors_group)]
