"""The workers' due-time timer: due work is started when it falls due, not at the next sweep.

`DueWakeThread.once()` is what the thread does each tick; here it is called directly, and the
thin task it enqueues is then run as a worker would, against a real MLLP RIS.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from django_q.models import OrmQ

from pacslens.ops.due_wake import DELIVER_TASK, DueWakeThread, delivery_due_at
from results.deliver.ledger import deliveries_create
from results.delivery_tasks import deliver_pending
from results.models import Delivery, DeliveryState, Destination
from routing.models import StoreAssociation
from tests.support.factories import hl7_destination, inferred_study

pytestmark = pytest.mark.django_db


def queued(func: str) -> int:
    return sum(1 for row in OrmQ.objects.all() if row.task.get("func") == func)


@pytest.fixture
def waiting_delivery(data_dir, rule, mllp):
    """A delivery whose retry is due in an hour: the RIS failed once, and is back now."""
    hl7_destination(rule, mllp.port)
    study, result = inferred_study(data_dir)
    [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
    Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now() + timedelta(hours=1))
    OrmQ.objects.all().delete()  # the wake-up deliveries_create enqueued on commit
    return delivery


def test_a_retry_is_woken_when_it_falls_due(waiting_delivery, mllp):
    timer = DueWakeThread()
    assert timer.once() == 0 and queued(DELIVER_TASK) == 0  # not due yet: nothing to wake

    Delivery.objects.filter(pk=waiting_delivery.pk).update(next_attempt_at=timezone.now())
    assert timer.once() == 1 and queued(DELIVER_TASK) == 1
    assert timer.once() == 0  # once per due time, not every tick

    deliver_pending()  # what the woken worker runs
    waiting_delivery.refresh_from_db()
    assert waiting_delivery.state == DeliveryState.DELIVERED
    assert mllp.received == [waiting_delivery.idempotency_key]


def test_a_retry_behind_an_open_breaker_is_due_when_the_breaker_closes(waiting_delivery):
    now = timezone.now()
    Delivery.objects.filter(pk=waiting_delivery.pk).update(next_attempt_at=now - timedelta(seconds=5))
    Destination.objects.update(circuit_open_until=now + timedelta(seconds=10))
    assert delivery_due_at(now) == now + timedelta(seconds=10)
    assert DueWakeThread().once(now) == 0  # the breaker holds it: a wake-up would claim nothing
    assert DueWakeThread().once(now + timedelta(seconds=10)) == 1


def test_an_expired_lease_is_due(waiting_delivery):
    expired = timezone.now() - timedelta(seconds=1)
    Delivery.objects.filter(pk=waiting_delivery.pk).update(state=DeliveryState.IN_FLIGHT, lease_until=expired)
    assert delivery_due_at(timezone.now()) == expired


def test_an_ended_association_is_checked_when_its_grace_has_passed(data_dir, settings):
    settings.STUDY_RELEASE_GRACE = 2
    association = StoreAssociation.objects.create(calling_ae_title="MODALITY1", called_ae_title="PACSLENS")
    StoreAssociation.objects.filter(pk=association.pk).update(ended_at=timezone.now() - timedelta(seconds=1))
    timer = DueWakeThread()
    assert timer.once() == 0
    StoreAssociation.objects.filter(pk=association.pk).update(ended_at=timezone.now() - timedelta(seconds=3))
    assert timer.once() == 1 and queued("routing.tasks.check_completion_after_release") == 1
    assert timer.once() == 0  # asked for once
