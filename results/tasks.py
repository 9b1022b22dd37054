"""django-q2 tasks of the results app. Thin: no arguments or ids in, service calls, nothing else.

`infer_pending()` is enqueued by routing (by name) once it routed a study. It runs inference on
whatever routed study is most urgent: possibly another one, because the database decides order
(a STAT study overtakes a backlog of routine ones) and the task only says there may be work.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings

from results.inference.services import inference_run_pending, studies_inferring_stale

logger = logging.getLogger(__name__)


def infer_pending() -> int:
    """Infer routed studies, most urgent first. Returns how many were inferred."""
    return inference_run_pending()


def process_study(study_id: int) -> int:
    # Completion enqueued this name before routing.tasks.route_study: tasks under it may still
    # sit in the broker after an upgrade. Their study is routed by routing's sweep.
    return inference_run_pending()


def sweep_inference() -> int:
    """Scheduled: fail studies stuck inferring (their worker died) and infer whatever routed work
    is waiting. Routing complete studies whose task was lost is routing.tasks.sweep_completion's."""
    # A worker killed by the queue's timeout leaves its study INFERRING: after the task timeout
    # plus a margin, nobody is working on it any more.
    stale = studies_inferring_stale(older_than=timedelta(seconds=settings.Q_CLUSTER["timeout"] * 1.5))
    if stale:
        logger.warning("inference sweep: %s studies stuck inferring marked failed (timeout)", stale)
    return inference_run_pending()
