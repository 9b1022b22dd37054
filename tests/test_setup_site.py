from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django_q.models import Schedule

pytestmark = pytest.mark.django_db


def test_it_creates_one_admin_with_a_generated_password(data_dir, capsys):
    call_command("setup_site")
    out = capsys.readouterr().out
    password = out.split("password: ")[1].split()[0]
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.check_password(password)
    assert len(password) >= 20
    call_command("setup_site")
    assert "password" not in capsys.readouterr().out  # printed once only
    assert get_user_model().objects.count() == 1


def test_it_schedules_the_sweeps_idempotently(data_dir):
    call_command("setup_site")
    call_command("setup_site")
    assert Schedule.objects.filter(func="routing.tasks.sweep_completion").count() == 1


def test_a_fresh_site_allows_the_demo_sender_from_localhost_only(data_dir):
    from routing.models import ApplicationEntity

    call_command("setup_site")
    demo = ApplicationEntity.objects.get(ae_title="DEMO_MODALITY")
    assert demo.may_send and demo.check_peer_ip and demo.host == "127.0.0.1"
    demo.delete()
    ApplicationEntity.objects.create(ae_title="REALCT")
    call_command("setup_site")
    assert not ApplicationEntity.objects.filter(ae_title="DEMO_MODALITY").exists()
