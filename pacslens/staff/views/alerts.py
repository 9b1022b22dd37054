"""The Alerts page (PACS administrators): channels with a Send test alert button, rules, the
conditions active now and the alerts recently sent. Evaluation and sending live in
pacslens/ops/alerts; this page only configures and shows."""

from __future__ import annotations

from django.http import HttpResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from pacslens.ops.alerts.service import ChannelIncomplete, alert_test_send
from pacslens.staff.alert_forms import AlertChannelForm, AlertRuleForm
from pacslens.staff.views.access import actor, render_page, staff_view
from pacslens.staff.views.config import config_edit
from results.models import AlertChannel, AlertEvent, AlertRule, AlertState

RECENT_EVENTS = 30


@staff_view("results.view_alertchannel", "results.view_alertrule")
def alert_page(request) -> HttpResponse:
    context = {
        "nav": "alerts",
        "channels": AlertChannel.objects.all(),
        "rules": AlertRule.objects.prefetch_related("states"),
        "active": AlertState.objects.filter(active=True, rule__enabled=True)
        .select_related("rule")
        .order_by("started_at"),
        "events": AlertEvent.objects.prefetch_related("notifications__channel")[:RECENT_EVENTS],
    }
    return render_page(request, "alerts/page.html", context, fragment="status")


@staff_view("results.view_alertchannel", "results.change_alertchannel", "results.add_alertchannel")
def alert_channel_edit(request, pk: int | None = None) -> HttpResponse:
    instance = get_object_or_404(AlertChannel, pk=pk) if pk else None
    return config_edit(
        request,
        form_class=AlertChannelForm,
        instance=instance,
        title="Alert channel",
        success_url=reverse("alert_page"),
        nav="alerts",
    )


@staff_view("results.view_alertrule", "results.change_alertrule", "results.add_alertrule")
def alert_rule_edit(request, pk: int | None = None) -> HttpResponse:
    instance = get_object_or_404(AlertRule, pk=pk) if pk else None
    return config_edit(
        request,
        form_class=AlertRuleForm,
        instance=instance,
        title="Alert rule",
        success_url=reverse("alert_page"),
        nav="alerts",
    )


@staff_view("results.change_alertchannel")
@require_POST
def alert_channel_test(request, pk: int) -> HttpResponse:
    """Send a test alert now and say inline whether it went out."""
    channel = get_object_or_404(AlertChannel, pk=pk)
    problem = error = ""
    try:
        error = alert_test_send(channel=channel, actor=actor(request), request=request)
    except ChannelIncomplete as exc:
        problem = str(exc)
    return render(request, "alerts/test_result.html", {"channel": channel, "problem": problem, "error": error})
