"""The dashboard: one page whose panel re-renders itself every few seconds through htmx."""

from __future__ import annotations

from django.http import HttpResponse

from pacslens.staff.dashboard_data import dashboard_data
from pacslens.staff.views.access import render_page, staff_view

POLL_SECONDS = 5


@staff_view("routing.view_study")
def dashboard(request) -> HttpResponse:
    context = {"nav": "dashboard", "poll_seconds": POLL_SECONDS, **dashboard_data()}
    return render_page(request, "ui/dashboard.html", context, fragment="panel")
