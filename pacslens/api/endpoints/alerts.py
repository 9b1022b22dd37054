"""The Alerts page's status and its Send test alert button. Channels and rules are configuration
objects (`/config/alert-channels`, `/config/alert-rules` in config.py: the site YAML's
`alert_channels` and `alert_rules` sections validate them; a webhook URL is write-only)."""

from __future__ import annotations

from django.http import HttpRequest
from django.shortcuts import get_object_or_404
from ninja import Router

from pacslens.api import schemas
from pacslens.api.auth import require
from pacslens.api.problems import Problem
from pacslens.ops.alerts.service import ChannelIncomplete, alert_test_send
from results.models import AlertChannel, AlertEvent, AlertState

router = Router(tags=["alerts"])
# As the Alerts page (pacslens/staff/views/alerts.py).
VIEW = ("results.view_alertchannel", "results.view_alertrule")
TEST = ("results.change_alertchannel",)
RECENT_EVENTS = 30


@router.get("/alerts/active", response=list[schemas.AlertActive], summary="Conditions active now")
def alert_active_list(request: HttpRequest):
    """Each enabled rule's condition that is active now, per subject, oldest first."""
    require(request, *VIEW)
    states = AlertState.objects.filter(active=True, rule__enabled=True).select_related("rule").order_by("started_at")
    return [
        {
            "rule": s.rule.name,
            "condition": s.rule.condition,
            "subject": s.subject,
            "message": s.message,
            "started_at": s.started_at,
        }
        for s in states
    ]


@router.get("/alerts/events", response=list[schemas.AlertEventRow], summary="Alerts recently sent")
def alert_event_list(request: HttpRequest, limit: int = RECENT_EVENTS):
    """The latest alerts (a condition started or cleared), newest first, with each channel's
    delivery state. At most 200."""
    require(request, *VIEW)
    if not 1 <= limit <= 200:
        raise Problem(422, "limit: between 1 and 200.", errors=[("limit", "Between 1 and 200.")])
    events = AlertEvent.objects.select_related("rule").prefetch_related("notifications__channel")[:limit]
    return [
        {
            "id": e.pk,
            "at": e.at,
            "kind": e.kind,
            "condition": e.condition,
            "rule": e.rule.name if e.rule else None,
            "subject": e.subject,
            "title": e.title,
            "text": e.text,
            "notifications": [
                {"channel": n.channel.name, "state": n.state, "last_error": n.last_error} for n in e.notifications.all()
            ],
        }
        for e in events
    ]


@router.post(
    "/config/alert-channels/{int:object_id}/test", response=schemas.AlertTestOutcome, summary="Send a test alert"
)
def alert_channel_send_test(request: HttpRequest, object_id: int):
    """Send a test alert to the channel now, as the Alerts page's button: `sent` and, when it
    did not go out, `error` (the channel's last error too). 409 when the channel is not complete
    enough to send to. Audited."""
    client = require(request, *TEST)
    channel = get_object_or_404(AlertChannel, pk=object_id)
    try:
        error = alert_test_send(channel=channel, actor=client.actor, request=request, where="the automation API")
    except ChannelIncomplete as exc:
        raise Problem(409, str(exc)) from None
    return {"channel": channel.name, "sent": not error, "error": error}
