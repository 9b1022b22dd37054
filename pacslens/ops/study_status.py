"""The study status serializer: `study_status_data()` (the JSON of `manage.py study_status --json`,
keys documented in the README and only ever added to) and `study_status_text()` (its text form).

Patient name and ID are deliberately absent: support output gets pasted into tickets.
"""

from __future__ import annotations

from django.db.models import Count, Sum

from results.deliver.identity import installation_current
from results.models import Delivery
from routing.models import Priority, Study


def study_status_data(study: Study) -> dict:
    """Everything support needs about a study, JSON-ready (no patient name or ID)."""
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


def study_status_text(data: dict) -> str:
    """The same data for a person at a shell: one line per fact, the timeline last."""
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
    lines.extend(_pipeline_lines(data))
    lines.append("Timeline")
    for e in data["timeline"]:
        delta = f"+{e['seconds_since_previous']:.3f}s" if e["seconds_since_previous"] is not None else ""
        lines.append(f"  {e['at']}  {delta:>10}  {e['kind']:<18} {e['detail']}")
    return "\n".join(lines)


def study_routing_status(study: Study) -> dict | None:
    """The latest routing decision: which rules matched and why, or None before routing."""
    decision = study.routing_decision()
    if decision is None:
        return None
    return {
        "decided_at": decision.decided_at.isoformat(),
        "matched_rules": [rule["name"] for rule in decision.matched_rules],
        "models": [f"{m.name} {m.version}" for m in decision.ai_models.order_by("name", "version")],
        "priority": Priority(decision.priority).label.lower()
        if decision.priority in Priority.values
        else decision.priority,
        "reason": decision.reason,
    }


def study_results_status(study: Study) -> list[dict]:
    """Every inference result, newest first; `current` is false once a re-run superseded it."""
    superseded = set(study.inference_results.exclude(supersedes=None).values_list("supersedes_id", flat=True))
    return [
        {
            "id": r.pk,
            "created_at": r.created_at.isoformat(),
            "model": r.model_name,
            "model_version": r.model_version,
            "model_sha256": r.model_sha256,
            # Shadow mode: recorded and audited, never delivered.
            "shadow": r.shadow,
            "status": r.status,
            "score": r.score,
            "flagged": r.flagged,
            "label": r.label,
            "key_region": r.key_region or None,
            "failure_reason": r.failure_reason or None,
            "message": r.message,
            "series_instance_uid": r.series_instance_uid,
            "instance_count": r.instance_count,
            "load_seconds": _rounded(r.load_seconds),
            "preprocess_seconds": _rounded(r.preprocess_seconds),
            "infer_seconds": _rounded(r.infer_seconds),
            "supersedes": r.supersedes_id,
            "current": r.pk not in superseded,
            "demonstration": r.model.demonstration,
            "uid": str(r.uid),
        }
        for r in study.inference_results.select_related("model").order_by("-created_at", "-id")
    ]


def study_deliveries_status(study: Study) -> list[dict]:
    """Every delivery of the study with all its attempts (oldest first)."""
    rows = Delivery.objects.filter(study=study).select_related("destination").prefetch_related("attempt_log")
    return [
        {
            "id": d.pk,
            "result": d.result_id,
            "destination": d.destination.name,
            "kind": d.kind,
            "idempotency_key": d.idempotency_key,
            "state": d.state,
            "attempts": d.attempts,
            "next_attempt_at": d.next_attempt_at.isoformat() if d.state == "pending" else None,
            # The later of next_attempt_at and the destination's open circuit breaker.
            "next_try_at": d.next_try_at.isoformat() if d.next_try_at else None,
            "held_by_breaker": d.held_by_breaker,
            "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None,
            "last_error": d.last_error or None,
            "last_error_class": d.last_error_class or None,
            "attempt_log": [
                {
                    "number": a.number,
                    "started_at": a.started_at.isoformat(),
                    "ended_at": a.ended_at.isoformat(),
                    "outcome": a.outcome,
                    "code": a.code or None,
                    "message": a.message,
                }
                for a in d.attempt_log.all()
            ],
        }
        for d in rows.order_by("pk")
    ]


def _pipeline_lines(data: dict) -> list[str]:
    """Routing, results and deliveries, for study_status_text."""
    routing = data.get("routing")
    if routing is None:
        lines = ["Routing    not routed yet"]
    else:
        rules = ", ".join(routing["matched_rules"]) or "no rule"
        lines = [f"Routing    {rules} -> {', '.join(routing['models']) or 'nothing to run'} ({routing['priority']})"]
        if not routing["matched_rules"]:
            lines.append(f"           {routing['reason']}")
    results = data.get("results") or []
    lines.append("Results" + ("" if results else "    none"))
    for r in results:
        head = f"  #{r['id']} {r['model']} {r['model_version']}{' (demonstration)' if r['demonstration'] else ''}"
        if r["status"] == "succeeded":
            flag = "FLAGGED" if r["flagged"] else "not flagged"
            body = f"score {r['score']:.3f} {flag} ({r['label']})"
        elif r["status"] == "failed":
            body = f"FAILED {r['failure_reason']}: {r['message']}"
        else:
            body = f"not applicable: {r['message']}"
        timing = ""
        if r["load_seconds"] is not None and r["infer_seconds"] is not None:
            timing = (
                f"  load {r['load_seconds']:.2f}s prep {r['preprocess_seconds']:.2f}s infer {r['infer_seconds']:.2f}s"
            )
        superseded = "" if r["current"] else "  [superseded]"
        lines.append(f"{head}: {body}{timing}{superseded}")
    deliveries = data.get("deliveries") or []
    lines.append("Deliveries" + ("" if deliveries else " none"))
    for d in deliveries:
        lines.append(
            f"  #{d['id']} result #{d['result']} -> {d['destination']} ({d['kind']}): {d['state']}, {d['attempts']} attempt(s), key {d['idempotency_key']}"
        )
        for a in d["attempt_log"]:
            lines.append(f"      {a['started_at']}  {a['outcome']:<12} {a['code'] or '':<8} {a['message']}")
    return lines


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
