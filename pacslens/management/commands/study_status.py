"""`manage.py study_status STUDY_UID [--json]` for support work from a shell.

The --json form is stable: keys are documented in the README and only ever added to.
Patient name and ID are deliberately absent: support output gets pasted into tickets.
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count, Sum

from results.deliver.identity import installation_current
from pacslens.ops.study_status import render_status_lines, study_deliveries_status, study_results_status, study_routing_status
from routing.models import Study


def study_status_data(study: Study) -> dict:
    series = study.series.annotate(instance_count=Count("instances"), bytes=Sum("instances__size")).order_by(
        "series_number", "pk"
    )
    events = list(study.events.all())
    return {
        "study_instance_uid": study.study_instance_uid,
        "internal_id": study.pk,
        "state": study.state,
        "priority": study.get_priority_display().lower(),
        "accession_number": study.accession_number,
        "modalities": [m for m in study.modalities.split("\\") if m],
        "sending_ae_title": study.calling_ae_title,
        "first_received_at": study.first_received_at.isoformat(),
        "last_received_at": study.last_received_at.isoformat(),
        "completed_at": study.completed_at.isoformat() if study.completed_at else None,
        "series_count": len(series),
        "instance_count": sum(s.instance_count for s in series),
        "series": [
            {
                "series_instance_uid": s.series_instance_uid,
                "modality": s.modality,
                "body_part_examined": s.body_part_examined,
                "series_description": s.series_description,
                "instance_count": s.instance_count,
                "bytes": s.bytes or 0,
            }
            for s in series
        ],
        "timeline": [
            {
                "at": e.at.isoformat(),
                "kind": e.kind,
                "from_state": e.from_state,
                "to_state": e.to_state,
                "detail": e.detail,
                "seconds_since_previous": round((e.at - events[i - 1].at).total_seconds(), 3) if i else None,
            }
            for i, e in enumerate(events)
        ],
        "routing": study_routing_status(study),
        "results": study_results_status(study),
        "deliveries": study_deliveries_status(study),
        # The gateway whose identifiers these are (README: how identifiers are made).
        "installation": str(installation_current().uuid),
    }


class Command(BaseCommand):
    help = "Show a study's state, counts, sender and timeline."

    def add_arguments(self, parser) -> None:
        parser.add_argument("study_uid", help="Study Instance UID (or the internal id)")
        parser.add_argument("--json", action="store_true", help="Machine-readable output (stable keys)")

    def handle(self, *args, study_uid: str, **options) -> None:
        study = Study.objects.by_uid_or_pk(study_uid)
        if study is None:
            raise CommandError(f"no study with Study Instance UID {study_uid}")
        data = study_status_data(study)
        if options["json"]:
            self.stdout.write(_dumps(data))
            return
        self.stdout.write(render_text(data))


def _dumps(data: dict) -> str:
    return json.dumps(data, indent=2)


def render_text(data: dict) -> str:
    lines = [
        f"Study      {data['study_instance_uid']}  (id {data['internal_id']})",
        f"State      {data['state']}   priority {data['priority']}",
        f"Accession  {data['accession_number'] or '-'}   modalities {', '.join(data['modalities']) or '-'}",
        f"From       {data['sending_ae_title'] or '-'}",
        f"Gateway    installation {data['installation']}",
        f"Received   {data['first_received_at']} .. {data['last_received_at']}",
        f"Counts     {data['series_count']} series, {data['instance_count']} instances",
    ]
    for s in data["series"]:
        lines.append(
            f"  series {s['series_instance_uid']}  {s['modality']} {s['body_part_examined']}"
            f"  {s['instance_count']} instances  {s['series_description']}"
        )
    lines.extend(render_status_lines(data))
    lines.append("Timeline")
    for e in data["timeline"]:
        delta = f"+{e['seconds_since_previous']:.3f}s" if e["seconds_since_previous"] is not None else ""
        lines.append(f"  {e['at']}  {delta:>10}  {e['kind']:<18} {e['detail']}")
    return "\n".join(lines)
