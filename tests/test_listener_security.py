"""The listener's association policy under attack or failure, over real sockets (pynetdicom SCUs)."""

from __future__ import annotations

import os
import time
from io import BytesIO

import pytest
from django.db import DatabaseError, OperationalError
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from pacslens.ops.schedules import SCHEDULES
from pacslens.site_config.ae_titles import AE_TITLES
from pacslens.staff.forms import ApplicationEntityForm
from routing.models import ApplicationEntity, Instance
from routing.receive.listener import DicomListener
from routing.tasks import sweep_incoming
from tests.test_listener import CALLING, associate, encode, make_ct


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


class TestFailureStatuses:
    def test_a_busy_database_answers_out_of_resources_and_leaves_no_file(self, listener, data_dir, monkeypatch):
        def locked(**kwargs):
            raise OperationalError("database is locked")

        monkeypatch.setattr("routing.store.spool.instance_record", locked)
        assoc = associate(listener)
        assert assoc.send_c_store(make_ct()).Status == 0xA700  # out of resources: the sender retries
        assoc.release()
        assert not list((data_dir / "incoming").iterdir())
        assert not [p for p in (data_dir / "instances").rglob("*") if p.is_file()]

    def test_an_abort_mid_transfer_leaves_no_temporary_file(self, listener, data_dir):
        assoc = associate(listener)
        fragments = c_store_fragments(assoc, make_ct(), pixel_bytes=2 * 1024 * 1024)
        for primitive in fragments[: len(fragments) // 2]:
            assoc.dul.send_pdu(primitive)
        incoming = data_dir / "incoming"
        assert wait_for(lambda: list(incoming.iterdir())), "the listener never started the receive"
        assoc.abort()
        assert wait_for(lambda: not list(incoming.iterdir())), list(incoming.iterdir())
        assert not Instance.objects.exists()

    def test_the_schedule_sweeps_orphaned_files_after_an_hour(self, data_dir):
        incoming = data_dir / "incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        orphan, receiving = incoming / "tmpold.dcm", incoming / "tmpnew.dcm"
        orphan.write_bytes(b"x")
        receiving.write_bytes(b"x")
        two_hours_ago = time.time() - 7200
        os.utime(orphan, (two_hours_ago, two_hours_ago))
        assert "routing.tasks.sweep_incoming" in dict(SCHEDULES)
        assert sweep_incoming() == 1
        assert list(incoming.iterdir()) == [receiving]


def c_store_fragments(assoc, ds, *, pixel_bytes: int) -> list:
    """The P-DATA primitives of one C-STORE request, as pynetdicom would send them."""
    ds.Rows, ds.Columns = 1024, pixel_bytes // 2048
    ds.PixelData = b"\x00\x01" * (pixel_bytes // 2)
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(encode(ds))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == ds.SOPClassUID)
    return list(message.encode_msg(context.context_id, 16384))


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())
