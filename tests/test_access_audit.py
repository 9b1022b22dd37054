"""Every change of who may do what is audited with who, what and when, however it is made: the
Django admin (a real superuser session posting its forms), management commands and plain ORM
calls. The audit rows never hold a password or token hash."""

from __future__ import annotations

import sys

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.core.management import call_command

from routing.models import AuditEntry, StowSender
from tests.support.factories import PASSWORD

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("plain_static_storage")]


def access_rows(**filters):
    return list(AuditEntry.objects.filter(action="access", **filters).order_by("at", "id"))


@pytest.fixture
def root(client, users):
    client.force_login(users["superuser"])
    AuditEntry.objects.all().delete()  # the fixture's own users and groups were audited too
    return client


class TestDjangoAdmin:
    def test_creating_a_user_is_audited_with_who_and_where(self, root):
        response = root.post(
            "/admin/auth/user/add/",
            {"username": "newbie", "password1": "A-long-enough-pass-77", "password2": "A-long-enough-pass-77"},
            REMOTE_ADDR="192.0.2.10",
        )
        assert response.status_code == 302, response.content.decode()[:2000]
        [entry] = access_rows(object_type="auth.user")
        user = User.objects.get(username="newbie")
        assert (entry.actor, entry.object_id, entry.object_repr, entry.remote_addr) == (
            "root",
            str(user.pk),
            "newbie",
            "192.0.2.10",
        )
        assert entry.detail == "user created" and entry.after["is_superuser"] is False
        assert entry.after["password"] == "********" and user.password not in str(entry.after)

    def test_group_membership_and_superuser_changes_made_in_the_admin(self, root, users):
        user = users["nobody"]
        informaticists = Group.objects.get(name="Informaticists")
        form = {
            "username": "nobody",
            "first_name": "",
            "last_name": "",
            "email": "nobody@example.org",
            "is_active": "on",
            "is_superuser": "on",
            "groups": [str(informaticists.pk)],
            "date_joined_0": user.date_joined.strftime("%Y-%m-%d"),
            "date_joined_1": user.date_joined.strftime("%H:%M:%S"),
        }
        response = root.post(f"/admin/auth/user/{user.pk}/change/", form)
        assert response.status_code == 302, response.content.decode()[:3000]
        rows = access_rows(object_id=str(user.pk))
        details = [row.detail for row in rows]
        assert details == ["user changed: is_superuser", "groups added: Informaticists"]
        assert all(row.actor == "root" for row in rows)
        assert ("is_superuser", False, True) in rows[0].changed_fields
        assert rows[1].changed_fields == [("groups", "(none)", "Informaticists")]  # as the audit page shows them
        assert (rows[1].before, rows[1].after) == ({"groups": []}, {"groups": ["Informaticists"]})

    def test_group_permissions_and_deletion(self, root):
        group = Group.objects.create(name="Night shift")
        view_delivery = Permission.objects.get(codename="view_delivery")
        response = root.post(
            f"/admin/auth/group/{group.pk}/change/", {"name": "Night shift", "permissions": [view_delivery.pk]}
        )
        assert response.status_code == 302
        response = root.post(f"/admin/auth/group/{group.pk}/delete/", {"post": "yes"})
        assert response.status_code == 302
        details = [(row.actor, row.detail) for row in access_rows(object_type="auth.group", object_id=str(group.pk))]
        assert details[-2:] == [("root", "permissions added: results.view_delivery"), ("root", "group deleted")]

    def test_a_save_without_a_change_and_a_login_write_nothing(self, client, users):
        AuditEntry.objects.all().delete()
        user = users["admin"]
        user.save()
        response = client.post("/login/", {"username": "admin", "password": PASSWORD})  # saves last_login
        assert response.status_code == 302
        assert access_rows() == []


class TestCommandsAndCode:
    def test_a_management_command_is_named_with_the_os_user(self, monkeypatch):
        monkeypatch.setattr(sys, "argv", ["/opt/pacslens/manage.py", "createsuperuser"])
        monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "A-long-enough-pass-77")
        call_command("createsuperuser", "--noinput", "--username", "second", "--email", "s@example.org")
        [entry] = access_rows(object_repr="second")
        assert entry.actor.endswith("(manage.py createsuperuser)") and entry.after["is_superuser"] is True
        assert entry.remote_addr is None

    def test_stow_tokens_created_and_revoked(self, monkeypatch):
        monkeypatch.setattr(sys, "argv", ["manage.py", "stow_token"])
        call_command("stow_token", "create", "CTSCANNER")
        call_command("stow_token", "revoke", "CTSCANNER")
        sender = StowSender.objects.get(name="CTSCANNER")
        rows = access_rows(object_type="routing.stowsender")
        assert [row.detail for row in rows] == ["stow sender created", "stow sender token revoked"]
        assert rows[1].changed_fields == [("revoked_at", None, str(sender.revoked_at))]
        assert sender.token_hash not in str([(r.before, r.after) for r in rows])

    def test_memberships_from_either_side_and_passwords(self, users):
        AuditEntry.objects.all().delete()
        user, group = users["nobody"], Group.objects.get(name="PACS administrators")
        group.user_set.add(user)
        user.groups.clear()
        user.user_permissions.add(Permission.objects.get(codename="retry_delivery"))
        user.set_password("another-long-pass-88")
        user.save()
        rows = access_rows(object_type="auth.user", object_id=str(user.pk))
        assert [row.detail for row in rows] == [
            "groups added: PACS administrators",
            "groups removed: PACS administrators",
            "permissions added: results.retry_delivery",
            "user changed: password",
        ]
        assert rows[-1].changed_fields == [("password", "********", "******** (changed)")]
        assert "pbkdf2" not in str([(r.before, r.after) for r in rows]) and user.password not in str(rows[-1].after)


class TestAuditLogPage:
    def test_access_changes_can_be_filtered(self, root, users):
        users["nobody"].groups.add(Group.objects.get(name="Informaticists"))
        page = root.get("/audit/log/", {"action": "access"}, HTTP_HX_REQUEST="true").content.decode()
        assert "Changed access" in page and "groups added: Informaticists" in page and "auth.user" in page


def test_the_receivers_listen_to_the_audited_models_only():
    # A receiver for every model would run on each instance the listener records, and would make
    # its raw-SQL insert fall back to the ORM (routing/store/records.py).
    from django.db.models import signals

    from routing.models import Instance, Study, StudyEvent

    for model in (Instance, Study, StudyEvent):
        for signal in (signals.pre_save, signals.post_save, signals.post_delete):
            assert not signal.has_listeners(model), (signal, model)
    assert signals.post_save.has_listeners(Group) and signals.post_save.has_listeners(StowSender)
