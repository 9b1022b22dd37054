"""Backfill over a Study Date range from Orthanc: dry run, interrupted, resumed, each study once."""

from __future__ import annotations

import io
from datetime import date, datetime

import pytest
from django.core.management import call_command
from django.utils import timezone

from routing.models import Backfill, Instance, Poll, Study, StudyRetrieve
from routing.pull.backfill import backfill_run
from tests.support.pull import make_source, orthanc_study

pytestmark = [pytest.mark.interop]


def day(text: str) -> datetime:
    return timezone.make_aware(datetime.fromisoformat(text + "T09:30:00"))


@pytest.fixture
def history(pacs, orthanc):
    """Three studies inside 2024-01-01..2024-01-05 and one just outside."""
    inside = [orthanc_study(orthanc, 2, when=day(d)) for d in ("2024-01-01", "2024-01-02", "2024-01-05")]
    outside = orthanc_study(orthanc, 1, when=day("2023-12-31"))
    source = make_source(pacs, retrieve_mode="c-get", min_query_spacing_seconds=0, enabled=False)
    return source, inside, outside


class TestBackfill:
    def test_dry_run_counts_and_changes_nothing(self, history):
        source, inside, _ = history
        out = io.StringIO()
        call_command(
            "backfill",
            source.name,
            "--from",
            "2024-01-01",
            "--to",
            "2024-01-05",
            "--dry-run",
            stdout=out,
            stderr=io.StringIO(),
        )
        assert "5/5 days queried, would consider 3 studies" in out.getvalue()
        assert not StudyRetrieve.objects.exists() and not Backfill.objects.exists() and not Study.objects.exists()

    def test_interrupted_then_resumed_retrieves_each_study_once(self, history):
        source, inside, outside = history
        stop = {"now": False}

        def report(progress):
            stop["now"] = progress.retrieved >= 1  # as if Ctrl-C arrived after the first study

        first = backfill_run(
            source=source,
            date_from=date(2024, 1, 1),
            date_to=date(2024, 1, 5),
            should_stop=lambda: stop["now"],
            report=report,
        )

        assert (first.interrupted, first.retrieved) == (True, 1)
        backfill = Backfill.objects.get()
        assert backfill.finished_at is None and backfill.next_date == date(2024, 1, 2)

        out = io.StringIO()
        call_command(
            "backfill", source.name, "--from", "2024-01-01", "--to", "2024-01-05", stdout=out, stderr=io.StringIO()
        )

        assert "retrieved 2, failed 0" in out.getvalue()
        backfill.refresh_from_db()
        assert backfill.finished_at is not None and backfill.next_date == date(2024, 1, 6)
        assert sorted(StudyRetrieve.objects.values_list("study_instance_uid", flat=True)) == sorted(inside)
        assert set(StudyRetrieve.objects.values_list("state", "attempts")) == {("done", 1)}
        assert set(Study.objects.values_list("state", flat=True)) == {"complete"}
        assert Instance.objects.count() == 6 and not Study.objects.filter(study_instance_uid=outside).exists()
        assert Poll.objects.filter(kind="backfill").count() == 5  # day 1 queried once: the cursor moved on

        again = io.StringIO()
        call_command(
            "backfill", source.name, "--from", "2024-01-01", "--to", "2024-01-05", stdout=again, stderr=io.StringIO()
        )
        assert "found 3 studies (0 new), retrieved 0" in again.getvalue()
        assert Instance.objects.count() == 6

    def test_unknown_source_names_the_known_ones(self, history):
        from django.core.management.base import CommandError

        with pytest.raises(CommandError, match="known: orthanc"):
            call_command("backfill", "nope", "--from", "2024-01-01", "--to", "2024-01-02")
