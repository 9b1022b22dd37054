"""Re-run inference on a study at a staff member's request.

The study goes back to COMPLETE (with an event naming who asked), and `process_study` is enqueued
on commit: routing and inference run again exactly as for a newly completed study, and each new
result supersedes the current one (results are never edited).
"""

from __future__ import annotations

from django.db import transaction

from routing.models import Study, StudyState

# Only a study the pipeline is done with: re-running one in flight would race its own worker.
RERUNNABLE_STATES = [StudyState.INFERRED, StudyState.DELIVERED, StudyState.FAILED, StudyState.IGNORED]


def study_rerun(*, study: Study, actor: str) -> bool:
    """True when the study was sent back to routing and inference; False if it is still being worked on."""
    with transaction.atomic():
        moved = study.transition(
            StudyState.COMPLETE, from_states=RERUNNABLE_STATES, detail=f"inference re-run requested by {actor}", kind="rerun_requested"
        )
        if moved:
            from django_q.tasks import async_task

            study_id = study.pk
            transaction.on_commit(lambda: async_task("results.tasks.process_study", study_id))
    return moved
