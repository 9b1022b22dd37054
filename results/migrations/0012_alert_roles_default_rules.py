# The staff roles get the new pages' permissions: PACS administrators configure alerts (and see
# failed retrieves), informaticists work failed retrieves in the failure queue (docs/ui.md). A fresh site also
# gets the alert rules that need no parameters, so adding a channel is all it takes.

from django.db import migrations

GROUP_PERMISSIONS = {
    "PACS administrators": [
        *(f"results.{a}_{m}" for m in ("alertchannel", "alertrule") for a in ("view", "add", "change", "delete")),
        "routing.view_studyretrieve",  # they see the failure queue read-only (0008), failed pulls included
    ],
    "Informaticists": [
        "routing.view_studyretrieve",
        "routing.retry_studyretrieve",
        "routing.discard_studyretrieve",
    ],
}
DEFAULT_RULES = [
    {"name": "failure-queue", "condition": "failure_queue"},
    {"name": "circuit-open", "condition": "circuit_open"},
    {"name": "pull-failed", "condition": "pull_failed"},
    {"name": "disk-low", "condition": "disk_low"},
    {"name": "heartbeat-missing", "condition": "heartbeat_missing"},
    {"name": "model-failure-rate", "condition": "model_failure_rate", "threshold_percent": 20.0},
]


def grant_permissions(apps, schema_editor):
    from django.contrib.auth.management import create_permissions

    for app_config in apps.get_app_configs():
        models_module = getattr(app_config, "models_module", None)
        app_config.models_module = models_module or True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = models_module
    Permission = apps.get_model("auth", "Permission")
    Group = apps.get_model("auth", "Group")
    for group_name, perms in GROUP_PERMISSIONS.items():
        group, _ = Group.objects.get_or_create(name=group_name)
        for perm in perms:
            app_label, codename = perm.split(".")
            group.permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))


def default_rules(apps, schema_editor):
    AlertRule = apps.get_model("results", "AlertRule")
    for values in DEFAULT_RULES:
        AlertRule.objects.get_or_create(name=values["name"], defaults=values)


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("routing", "0012_retrieve_discard"),
        ("results", "0011_alerts"),
    ]

    operations = [
        migrations.RunPython(grant_permissions, migrations.RunPython.noop),
        migrations.RunPython(default_rules, migrations.RunPython.noop),
    ]
