# Webhook subscriptions are configuration of where result events go, like destinations: PACS
# administrators manage them (docs/ui.md), auditors may read them (never the URL or secret).

from django.db import migrations

GROUP_PERMISSIONS = {
    "PACS administrators": [f"results.{a}_webhooksubscription" for a in ("view", "add", "change", "delete")],
    "Auditors": ["results.view_webhooksubscription"],
}


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


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("routing", "0004_audit_entry_staff_groups"),
        ("results", "0015_webhooks"),
    ]

    operations = [migrations.RunPython(grant_permissions, migrations.RunPython.noop)]
