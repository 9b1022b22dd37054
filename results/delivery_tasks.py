"""django-q2 tasks of the delivery ledger. They carry no arguments: the database decides
which delivery is most urgent, the task only says there may be work."""

from __future__ import annotations

from results.deliver.ledger import deliveries_run_pending
from results.deliver.webhooks import webhooks_send_due


def deliver_pending() -> int:
    return deliveries_run_pending(budget_seconds=60.0)


def sweep_deliveries() -> int:
    """Scheduled: retries whose backoff ended, expired leases (a killed worker), lost triggers."""
    return deliveries_run_pending(budget_seconds=25.0)


def send_webhooks() -> int:
    """Woken on commit of an event, by the due-time timer, and every minute as a sweep."""
    return webhooks_send_due()
