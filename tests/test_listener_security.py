"""The listener's association policy under attack or failure, over real sockets (pynetdicom SCUs)."""

from __future__ import annotations

import pytest
from django.db import DatabaseError

from pacslens.site_config.ae_titles import AE_TITLES
from pacslens.staff.forms import ApplicationEntityForm
from routing.models import ApplicationEntity, Instance
from routing.receive.listener import DicomListener
from tests.test_listener import CALLING, associate, make_ct


@pytest.fixture
def listener(transactional_db, data_dir):
    ApplicationEntity.objects.create(ae_title=CALLING, host="127.0.0.1", may_send=True)
    dicom = DicomListener(host="127.0.0.1", port=0, ae_title="PACSLENS")
    dicom.start()
    yield dicom
    dicom.stop(grace=2)


@pytest.fixture
def broken_allow_list(monkeypatch):
    """Every allow-list read raises, as a locked or unreachable database does."""

    def fail(*args, **kwargs):
        raise DatabaseError("database is locked")

    def breaks(listener: DicomListener) -> None:
        monkeypatch.setattr(ApplicationEntity.objects, "filter", fail)
        listener.refresh_allow_list()

    return breaks


class TestFailClosed:
    def test_it_rejects_the_association_transiently_when_the_check_fails(self, listener, broken_allow_list):
        broken_allow_list(listener)
        assoc = associate(listener)
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 1)  # transient: temporary congestion

    def test_it_refuses_a_store_when_the_check_fails_mid_association(self, listener, broken_allow_list, data_dir):
        assoc = associate(listener)
        assert assoc.is_established
        broken_allow_list(listener)
        assert assoc.send_c_store(make_ct()).Status == 0xA700  # out of resources: the sender retries
        assoc.release()
        assert not Instance.objects.exists()
        assert not list((data_dir / "incoming").iterdir())

    def test_it_refuses_a_store_from_a_sender_no_longer_allowed(self, listener, data_dir):
        assoc = associate(listener)
        assert assoc.is_established
        ApplicationEntity.objects.filter(ae_title=CALLING).update(may_send=False)
        listener.refresh_allow_list()
        assert assoc.send_c_store(make_ct()).Status == 0x0124  # refused: not authorised
        assoc.release()
        assert not Instance.objects.exists()
        assert not list((data_dir / "incoming").iterdir())

    def test_it_serves_again_once_the_database_answers(self, listener, broken_allow_list, monkeypatch):
        broken_allow_list(listener)
        assert associate(listener).is_rejected
        monkeypatch.undo()
        listener.refresh_allow_list()
        assoc = associate(listener)
        assert assoc.send_c_store(make_ct()).Status == 0x0000
        assoc.release()
        assert Instance.objects.get().study.sender.ae_title == CALLING


class TestSpoofedAeTitles:
    def test_a_new_sender_has_its_address_checked_by_default(self, listener):
        ApplicationEntity.objects.create(ae_title="NEWPACS", host="192.0.2.10")
        assoc = associate(listener, calling="NEWPACS")
        assert assoc.is_rejected
        assert assoc.acceptor.primitive.diagnostic == 3

    def test_a_new_sender_from_its_host_is_served(self, listener):
        ApplicationEntity.objects.create(ae_title="NEWPACS", host="127.0.0.1")
        assoc = associate(listener, calling="NEWPACS")
        assert assoc.send_c_store(make_ct()).Status == 0x0000
        assoc.release()

    def test_the_form_requires_a_host_for_a_sender(self, db):
        form = ApplicationEntityForm(data={"ae_title": "NEWPACS", "enabled": True, "may_send": True})
        assert not form.is_valid()
        assert "host" in form.errors
        assert form.fields["check_peer_ip"].initial is True

    def test_the_site_yaml_requires_a_host_for_a_sender(self, db):
        problems = AE_TITLES.validate(
            [{"ae_title": "NEWPACS", "may_send": True}, {"ae_title": "SR1", "may_send": False}]
        )
        assert len(problems) == 1
        assert "NEWPACS" in problems[0] and "'host'" in problems[0]

    def test_the_migration_leaves_existing_senders_as_they_were(self):
        from importlib import import_module

        migration = import_module("routing.migrations.0006_ae_sender_checks").Migration
        operations = [type(op).__name__ for op in migration.operations]
        assert sorted(operations) == ["AddField", "AlterField"]  # schema default only, no RunPython over rows
