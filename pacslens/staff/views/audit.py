"""The audit log page (superusers): who did what, when, with before/after for configuration."""

from __future__ import annotations

from django.core.paginator import Paginator
from django.http import HttpResponse

from pacslens.staff.views.access import render_page, staff_view
from routing.models import AuditAction, AuditEntry

PAGE_SIZE = 50


@staff_view(superuser=True)
def audit_log(request) -> HttpResponse:
    entries = AuditEntry.objects.all()
    action = request.GET.get("action", "")
    if action in AuditAction.values:
        entries = entries.filter(action=action)
    who = request.GET.get("actor", "").strip()
    if who:
        entries = entries.filter(actor__iexact=who)
    page = Paginator(entries, PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    context = {
        "nav": "audit",
        "page": page,
        "actions": AuditAction.choices,
        "action": action,
        "actor": who,
        "query": query.urlencode(),
    }
    return render_page(request, "ui/audit_log.html", context, fragment="table")
