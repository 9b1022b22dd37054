"""django-q2 tasks of the results app. Thin: ids in, service calls, nothing else.

`process_study(study_id)` is enqueued when a study completes. It routes that study, then runs
inference on whatever routed study is most urgent: possibly another one, because the database
decides order (a STAT study overtakes a backlog of routine ones) and the task only says there
may be work.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from results.inference.services import inference_run_pending, studies_inferring_stale
from routing.models import Study, StudyState
from routing.rules import study_route

logger = logging.getLogger(__name__)

# A COMPLETE study not routed after this long lost its task (worker killed, broker row lost).
ROUTING_IDLE = timedelta(minutes=1)


def process_study(study_id: int) -> int:
    """Route the study if it is complete, then infer pending studies. Returns how many were inferred."""
    study = Study.objects.filter(pk=study_id, state=StudyState.COMPLETE).first()
    if study is not None:
        study_route(study=study)
    return inference_run_pending()


def sweep_inference() -> int:
    """Scheduled: route complete studies whose task was lost, fail studies stuck inferring
    (their worker died), and infer whatever routed work is waiting."""
    now = timezone.now()
    for study in Study.objects.filter(state=StudyState.COMPLETE, completed_at__lt=now - ROUTING_IDLE):
        study_route(study=study)
    # A worker killed by the queue's timeout leaves its study INFERRING: after the task timeout
    # plus a margin, nobody is working on it any more.
    stale = studies_inferring_stale(older_than=timedelta(seconds=settings.Q_CLUSTER["timeout"] * 1.5))
    if stale:
        logger.warning("inference sweep: %s studies stuck inferring marked failed (timeout)", stale)
    return inference_run_pending()
