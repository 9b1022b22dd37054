"""The delivery ledger's services: create (outbox), claim, send, record, retry, discard.

Reading order: `deliveries_create` runs inside the inference transaction; `deliveries_run_pending`
is what workers run when woken; `delivery_retry` / `delivery_discard` are the staff actions.
Protocol work lives in sr / dicom_send / stow_client / hl7 / fhir; here we only decide what to
send where and what the outcome means for the row.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from django_q.tasks import async_task

from results.deliver import senders
from results.deliver.coding import coding_snapshot
from results.deliver.contents import delivery_identifier, delivery_key, result_payload
from results.deliver.lease import LeaseRenewal, lease_duration
from results.deliver.payload import (
    Outcome,
    OutcomeKind,
    Protocol,
)
from results.deliver.webhooks import webhook_events_record
from results.models import (
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Destination,
    ErrorClass,
    InferenceResult,
    WebhookEventType,
)
from results.models.inference import ResultStatus
from routing.models import Study, StudyState

logger = logging.getLogger(__name__)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --- the outbox: called inside the inference transaction -------------------------------------


def deliveries_create(*, study: Study, results: Iterable[InferenceResult], rule_ids: Iterable[int]) -> list[Delivery]:
    """One Delivery per succeeded live result and destination of the matched rules; wakes a worker on commit."""
    destinations = list(Destination.objects.filter(enabled=True, rules__id__in=list(rule_ids)).distinct())
    created = []
    for result in results:
        # Shadow results are recorded and audited, never delivered.
        if result.status != ResultStatus.SUCCEEDED or result.shadow:
            continue
        for destination in destinations:
            system, key = delivery_identifier(result=result, destination=destination)
            created.append(
                Delivery.objects.create(
                    result=result,
                    destination=destination,
                    study=study,
                    kind=destination.kind,
                    idempotency_key=key,
                    identifier_system=system,
                    # Fixed here with the key: re-sends send what the first attempt sent.
                    coding=coding_snapshot(destination),
                    priority=study.priority,
                )
            )
    if created:
        study.transition(
            StudyState.DELIVERING,
            from_states=[StudyState.INFERRED],
            detail=f"{len(created)} deliveries: " + ", ".join(sorted({d.destination.name for d in created})),
        )
        transaction.on_commit(enqueue_delivery)
    return created


def enqueue_delivery() -> None:
    async_task("results.delivery_tasks.deliver_pending")


# --- workers ---------------------------------------------------------------------------------


@dataclass
class RunContext:
    """What one worker keeps open while it drains the queue: associations to reuse."""

    worker: str = field(default_factory=worker_identity)
    sessions: dict = field(default_factory=dict)

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()


def deliveries_run_pending(*, budget_seconds: float = 60.0, only_ids: list[int] | None = None) -> int:
    """Claim and send due deliveries, most urgent first, until none is due or the budget is spent."""
    deadline = timezone.now() + timedelta(seconds=budget_seconds)
    context = RunContext()
    done = 0
    try:
        while timezone.now() < deadline:
            delivery = delivery_claim_next(worker=context.worker, only_ids=only_ids)
            if delivery is None:
                break
            delivery_send(delivery=delivery, context=context)
            done += 1
    finally:
        context.close()
    return done


def delivery_claim_next(*, worker: str, only_ids: list[int] | None = None) -> Delivery | None:
    """Compare-and-set claim of the most urgent due row; None when nothing is due."""
    now = timezone.now()
    due = Delivery.objects.filter(
        Q(state=DeliveryState.PENDING, next_attempt_at__lte=now)
        | Q(state=DeliveryState.IN_FLIGHT, lease_until__lt=now),
        destination__enabled=True,
    ).exclude(destination__circuit_open_until__gt=now)
    if only_ids is not None:
        due = due.filter(pk__in=only_ids)
    with transaction.atomic():
        # SKIP LOCKED (PostgreSQL) on the delivery rows only (`of`): concurrent workers take
        # different rows, and never lock the Destination row everyone joins. No-op on SQLite.
        candidates = list(
            due.select_related("destination")
            .select_for_update(skip_locked=True, of=("self",))
            .order_by("priority", "next_attempt_at", "pk")[:20]
        )
        return _claim_first(candidates, worker=worker, now=now)


def _claim_first(candidates: list[Delivery], *, worker: str, now) -> Delivery | None:
    for candidate in candidates:
        # The whole send, not one request: a FHIR send makes three, each with its own timeout.
        lease = lease_duration(candidate.destination)
        claimed = Delivery.objects.filter(
            pk=candidate.pk, state=candidate.state, attempts=candidate.attempts, lease_until=candidate.lease_until
        ).update(
            state=DeliveryState.IN_FLIGHT,
            lease_until=now + lease,
            lease_owner=worker,
            attempts=F("attempts") + 1,
        )
        if claimed != 1:
            continue  # another worker got it first
        if candidate.state == DeliveryState.IN_FLIGHT:
            # The previous holder died mid-attempt; what it did is unknown, the key makes a re-send safe.
            assert candidate.lease_until is not None  # an in-flight delivery always holds a lease
            DeliveryAttempt.objects.create(
                delivery=candidate,
                number=candidate.attempts,
                worker=candidate.lease_owner,
                started_at=candidate.lease_until - lease,
                ended_at=candidate.lease_until,
                outcome=ErrorClass.TRANSIENT,
                message="worker stopped mid-attempt (lease expired); sending again with the same key",
            )
        candidate.refresh_from_db()
        return candidate
    return None


def delivery_send(*, delivery: Delivery, context: RunContext | None = None) -> Outcome:
    """One attempt for a claimed delivery: send, then record the outcome on the row."""
    context = context or RunContext()
    started = timezone.now()
    try:
        payload = result_payload(result=delivery.result)
        with LeaseRenewal(delivery, delivery.lease_owner or context.worker):
            outcome = senders.send(
                destination=delivery.destination,
                payload=payload,
                key=delivery_key(delivery),
                context=context,
                coding=delivery.coding,
            )
    except senders.BuildError as exc:
        outcome = Outcome(OutcomeKind.PERMANENT, Protocol(delivery.kind), None, str(exc), delivery.idempotency_key)
    except Exception as exc:  # a bug or an unforeseen library error: retry, then fail visibly
        logger.exception("delivery %s: unexpected error", delivery.pk)
        outcome = Outcome(
            OutcomeKind.TRANSIENT,
            Protocol(delivery.kind),
            None,
            f"internal error: {type(exc).__name__}",
            delivery.idempotency_key,
        )
    delivery_record(delivery=delivery, outcome=outcome, started=started, worker=context.worker)
    return outcome


def delivery_record(*, delivery: Delivery, outcome: Outcome, started, worker: str) -> None:
    now = timezone.now()
    destination = delivery.destination
    code = (
        ""
        if outcome.code is None
        else (
            f"0x{outcome.code:04X}"
            if outcome.protocol == Protocol.DICOM and isinstance(outcome.code, int)
            else str(outcome.code)
        )
    )
    message = outcome.describe()[:2000]
    fields: dict = {"lease_until": None, "lease_owner": ""}
    retry_at = None
    if outcome.ok:
        fields.update(state=DeliveryState.DELIVERED, delivered_at=now, last_error="", last_error_class="")
        event = ("delivered", f"{destination.name}: delivered ({delivery.kind}, key {delivery.idempotency_key})")
    elif outcome.retryable and delivery.attempts < destination.max_attempts:
        retry_at = now + destination.backoff(delivery.attempts, random.random())
        fields.update(
            state=DeliveryState.PENDING,
            next_attempt_at=retry_at,
            last_error=message,
            last_error_class=outcome.kind.value,
        )
        event = (
            "delivery_retry",
            f"{destination.name}: attempt {delivery.attempts} failed, retry at {timezone.localtime(retry_at):%H:%M:%S}: {message}",
        )
    else:
        fields.update(state=DeliveryState.FAILED, last_error=message, last_error_class=outcome.kind.value)
        event = ("delivery_failed", f"{destination.name}: failed after {delivery.attempts} attempt(s): {message}")
    with transaction.atomic():
        DeliveryAttempt.objects.create(
            delivery=delivery,
            number=delivery.attempts,
            worker=worker,
            started_at=started,
            ended_at=now,
            outcome=outcome.kind.value,
            code=code,
            message=message,
        )
        # Only the lease holder may settle the row: a worker that overran its lease lost it.
        updated = Delivery.objects.filter(pk=delivery.pk, state=DeliveryState.IN_FLIGHT, lease_owner=worker).update(
            **fields
        )
        if updated != 1:
            logger.warning("delivery %s: lease lost before recording attempt %s", delivery.pk, delivery.attempts)
            return
        breaker_event = _destination_health(destination, outcome, now)
        if breaker_event:
            delivery.study.log_event(*breaker_event)
        held_until = destination.circuit_open_until
        if retry_at is not None and held_until is not None and held_until > retry_at:
            # The claim skips an open circuit's rows: the retry happens when the breaker lets it, say so.
            Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=held_until)
            event = (
                "delivery_retry",
                f"{destination.name}: attempt {delivery.attempts} failed, retry at {timezone.localtime(held_until):%H:%M:%S} "
                f"(held by the circuit breaker): {message}",
            )
        delivery.study.log_event(*event)
        if fields["state"] == DeliveryState.FAILED:
            delivery.last_error_class = outcome.kind.value
            webhook_events_record(event_type=WebhookEventType.DELIVERY_FAILED, study=delivery.study, delivery=delivery)
        study_delivery_settle(study=delivery.study)
    logger.info("delivery %s attempt %s: %s", delivery.pk, delivery.attempts, outcome.kind.value)


def _destination_health(destination: Destination, outcome: Outcome, now) -> tuple[str, str] | None:
    """Count the destination's failures and open or close its circuit breaker; returns the
    timeline event (kind, detail) when the breaker opened or closed, else None.
    `destination.circuit_open_until` is left as the database now holds it."""
    if outcome.ok:
        # A success closes a breaker that had opened (its cool-down over, this attempt got through).
        closed = Destination.objects.filter(pk=destination.pk, circuit_open_until__isnull=False).update(
            consecutive_failures=0, circuit_open_until=None, last_success_at=now
        )
        if not closed:
            Destination.objects.filter(pk=destination.pk).update(consecutive_failures=0, last_success_at=now)
        destination.circuit_open_until = None
        if closed:
            return ("circuit_closed", f"{destination.name}: circuit closed, the destination answers again")
        return None
    if outcome.kind is OutcomeKind.PERMANENT:
        # this object is refused; the destination itself is working
        destination.refresh_from_db(fields=["circuit_open_until"])
        return None
    Destination.objects.filter(pk=destination.pk).update(
        consecutive_failures=F("consecutive_failures") + 1, last_failure_at=now
    )
    destination.refresh_from_db(fields=["consecutive_failures", "circuit_open_until"])
    if destination.consecutive_failures >= destination.breaker_threshold:
        until = now + timedelta(seconds=destination.breaker_cooldown_seconds)
        Destination.objects.filter(pk=destination.pk).update(circuit_open_until=until)
        destination.circuit_open_until = until
        logger.warning(
            "destination %s: circuit open until %s after %s failures",
            destination.name,
            until,
            destination.consecutive_failures,
        )
        return (
            "circuit_open",
            f"{destination.name}: circuit open until {timezone.localtime(until):%H:%M:%S} after "
            f"{destination.consecutive_failures} failures in a row; its deliveries wait until then",
        )
    return None


def study_delivery_settle(*, study: Study) -> None:
    """Settle the study once no delivery of its current results is pending or in flight:
    DELIVERED when every one succeeded, FAILED when any failed (staff may retry it), CLOSED when
    staff discarded at least one and none failed (a discarded delivery was not delivered)."""
    # Lock the study first: two workers settling its last two deliveries at once would each see
    # the other's row still in flight (PostgreSQL, READ COMMITTED) and neither would settle it.
    Study.objects.select_for_update().filter(pk=study.pk).first()
    rows = Delivery.objects.filter(study=study, result__in=study.inference_results.current())
    states = list(rows.values_list("state", flat=True))
    if not states or any(s in (DeliveryState.PENDING, DeliveryState.IN_FLIGHT) for s in states):
        return
    delivered = states.count(DeliveryState.DELIVERED)
    failed = states.count(DeliveryState.FAILED)
    discarded = states.count(DeliveryState.DISCARDED)
    summary = (
        f"{delivered} of {len(states)} delivered"
        + (f", {failed} failed" if failed else "")
        + (f", {discarded} discarded" if discarded else "")
    )
    study.refresh_from_db(fields=["state"])
    if failed:
        study.transition(
            StudyState.FAILED,
            from_states=[StudyState.DELIVERING],
            detail=f"partial delivery: {summary}",
            kind="delivery_incomplete",
        )
    elif discarded:
        study.transition(
            StudyState.CLOSED,
            from_states=[StudyState.DELIVERING, StudyState.FAILED],
            detail=f"closed without full delivery: {summary}",
        )
    elif study.transition(StudyState.DELIVERED, from_states=[StudyState.DELIVERING, StudyState.FAILED], detail=summary):
        webhook_events_record(event_type=WebhookEventType.STUDY_DELIVERED, study=study)


# --- staff actions ---------------------------------------------------------------------------


def delivery_retry(*, deliveries, actor: str) -> int:
    """Put failed (or, on request, delivered) rows back in the queue with the same idempotency key."""
    ids = list(
        deliveries.filter(state__in=[DeliveryState.FAILED, DeliveryState.DELIVERED]).values_list("pk", flat=True)
    )
    now = timezone.now()
    with transaction.atomic():
        count = Delivery.objects.filter(pk__in=ids, state__in=[DeliveryState.FAILED, DeliveryState.DELIVERED]).update(
            state=DeliveryState.PENDING,
            attempts=0,
            next_attempt_at=now,
            lease_until=None,
            lease_owner="",
            last_error_class="",
            delivered_at=None,
        )
        for study in Study.objects.filter(deliveries__pk__in=ids).distinct():
            study.transition(
                StudyState.DELIVERING,
                from_states=[StudyState.FAILED, StudyState.DELIVERED, StudyState.CLOSED],
                detail=f"re-delivery requested by {actor}",
                kind="delivery_requeued",
            )
        # Staff asked for it now: an open breaker must not hold these rows. Say so in the timelines.
        held = Destination.objects.filter(deliveries__pk__in=ids, circuit_open_until__gt=now).distinct()
        for destination in held:
            for study in Study.objects.filter(deliveries__pk__in=ids, deliveries__destination=destination).distinct():
                study.log_event("circuit_closed", f"{destination.name}: circuit closed by the retry {actor} requested")
        Destination.objects.filter(deliveries__pk__in=ids).update(circuit_open_until=None)
        transaction.on_commit(enqueue_delivery)
    return count


def study_redeliver(*, study: Study, actor: str, destination_name: str | None = None) -> tuple[int, list[int]]:
    """Send the study's current results again: create the deliveries missing for destinations
    routed since, then re-queue them all (failed or delivered alike, with their original
    idempotency keys, so receivers keep one copy). Returns (how many were re-queued, the ids)."""
    current = study.inference_results.current().live().filter(status=ResultStatus.SUCCEEDED)
    with transaction.atomic():
        if study.state == StudyState.INFERRED:
            decision = study.routing_decision()
            rule_ids = [rule["id"] for rule in decision.matched_rules] if decision else []
            deliveries_create(study=study, results=list(current), rule_ids=rule_ids)
        rows = Delivery.objects.filter(result__in=current)
        if destination_name:
            rows = rows.filter(destination__name=destination_name)
        ids = list(rows.values_list("pk", flat=True))
        requeued = delivery_retry(deliveries=Delivery.objects.filter(pk__in=ids), actor=actor)
    return requeued, ids


def study_delivered_destinations(*, study: Study) -> list[str]:
    """Names of the destinations that already hold the study's current results (ask before re-sending)."""
    current = study.inference_results.current()
    rows = Delivery.objects.filter(result__in=current, state=DeliveryState.DELIVERED)
    return sorted(set(rows.values_list("destination__name", flat=True)))


class DiscardReasonRequired(ValueError):
    pass


def delivery_discard(*, delivery: Delivery, actor: str, reason: str) -> bool:
    reason = reason.strip()
    if not reason:
        raise DiscardReasonRequired("A reason is required to discard a delivery.")
    with transaction.atomic():
        updated = Delivery.objects.filter(
            pk=delivery.pk, state__in=[DeliveryState.FAILED, DeliveryState.PENDING]
        ).update(state=DeliveryState.DISCARDED, discarded_by=actor, discard_reason=reason[:2000], lease_until=None)
        if updated:
            delivery.study.log_event("delivery_discarded", f"{delivery.destination.name}: discarded by {actor}")
            study_delivery_settle(study=delivery.study)
    return bool(updated)
