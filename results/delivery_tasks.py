"""django-q2 tasks of the delivery ledger. They carry no arguments: the database decides
which delivery is most urgent, the task only says there may be work."""

from __future__ import annotations

from results.deliver.ledger import deliveries_run_pending


def deliver_pending() -> int:
    return deliveries_run_pending(budget_seconds=60.0)


def sweep_deliveries() -> int:
    """Scheduled: retries whose backoff ended, expired leases (a killed worker), lost triggers."""
    return deliveries_run_pending(budget_seconds=25.0)
