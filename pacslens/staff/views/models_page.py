"""Registered models: manifest, sha256, intended use, the demonstration label, studies run on,
and the score charts (scores and share flagged per day or week, shadow agreement)."""

from __future__ import annotations

import json

from django.db.models import Count
from django.http import HttpResponse

from pacslens.staff.score_charts import score_charts
from pacslens.staff.views.access import render_page, staff_view
from results.models import AIModel


@staff_view("results.view_aimodel")
def model_list(request) -> HttpResponse:
    models = AIModel.objects.annotate(study_count=Count("results__study", distinct=True), result_count=Count("results"))
    rows = [{"model": m, "manifest": json.dumps(m.manifest, indent=2, sort_keys=True)} for m in models]
    context = {"nav": "models", "rows": rows, **score_charts(period=request.GET.get("period", "day"))}
    return render_page(request, "results/models.html", context, fragment="table")
