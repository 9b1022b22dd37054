"""PACS administrators see the failure queue (read-only): they fix the endpoint, so they need to
see what failed. Retry and discard stay with the informaticists."""

from django.db import migrations

GROUP = "PACS administrators"
PERMISSIONS = [("results", "delivery", "view_delivery")]


def grant_queue_view(apps, schema_editor):
    from django.contrib.auth.management import create_permissions

    # On a fresh database the default permissions are only created after migrate.
    app_config = apps.get_app_config("results")
    models_module = getattr(app_config, "models_module", None)
    app_config.models_module = models_module or True
    create_permissions(app_config, apps=apps, verbosity=0)
    app_config.models_module = models_module
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group = Group.objects.filter(name=GROUP).first()
    if group is None:  # the site removed the role: nothing to grant
        return
    for app_label, model, codename in PERMISSIONS:
        group.permissions.add(
            Permission.objects.get(content_type__app_label=app_label, content_type__model=model, codename=codename)
        )


def revoke_queue_view(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group = Group.objects.filter(name=GROUP).first()
    if group is not None:
        for app_label, _model, codename in PERMISSIONS:
            group.permissions.remove(*Permission.objects.filter(content_type__app_label=app_label, codename=codename))


class Migration(migrations.Migration):
    dependencies = [
        ("results", "0007_discarded_studies_closed"),
        ("routing", "0004_audit_entry_staff_groups"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]

    operations = [migrations.RunPython(grant_queue_view, revoke_queue_view)]
