"""Routing rules: the list in evaluation order (move up / down), create and edit with conditions,
enable / disable, and a dry run showing each rule's and each condition's verdict on real studies."""

from __future__ import annotations

from django.contrib import messages
from django.db import transaction
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST
from django_htmx.http import HttpResponseClientRedirect

from pacslens.staff.forms import DryRunForm, RoutingRuleForm, RuleConditionFormSet
from pacslens.staff.views.access import actor, render_page, staff_view
from pacslens.staff.views.config import config_delete, config_toggle
from routing.models import AuditAction, AuditEntry, RoutingRule, Study
from routing.models.audit import config_snapshot
from routing.rules import study_explain_routing

DRY_RUN_STUDIES = 5
UNKNOWN_STUDY = "No study has this accession number, Study UID or id."
POSITION_STEP = 10


@staff_view("routing.view_routingrule")
def rule_list(request) -> HttpResponse:
    rules = RoutingRule.objects.prefetch_related(
        "conditions", "ai_models", "shadow_ai_models", "destinations"
    ).order_by("position", "id")
    return render_page(request, "rules/list.html", {"nav": "rules", "rules": rules}, fragment="table")


@staff_view("routing.view_routingrule", "routing.add_routingrule", "routing.change_routingrule")
def rule_edit(request, pk: int | None = None) -> HttpResponse:
    rule = get_object_or_404(RoutingRule, pk=pk) if pk else None
    creating = rule is None
    before = None if rule is None else rule_snapshot(rule)
    form = RoutingRuleForm(request.POST or None, instance=rule)
    formset = RuleConditionFormSet(request.POST or None, instance=rule or RoutingRule())
    if request.method == "POST" and form.is_valid() and formset.is_valid():
        with transaction.atomic():
            if creating:
                last = RoutingRule.objects.order_by("-position").values_list("position", flat=True).first() or 0
                form.instance.position = last + POSITION_STEP
            saved = form.save()
            formset.instance = saved
            formset.save()
            AuditEntry.record(
                actor=actor(request),
                action=AuditAction.CREATE if creating else AuditAction.UPDATE,
                obj=saved,
                object_repr=saved.name,
                before=before,
                after=rule_snapshot(saved),
                request=request,
            )
        messages.success(request, f"Rule {saved.name} saved.")
        if request.htmx:
            return HttpResponseClientRedirect(reverse("rule_list"))
        return redirect("rule_list")
    context = {"nav": "rules", "form": form, "formset": formset, "rule": rule, "creating": creating}
    return render(request, "rules/edit.html#form" if request.htmx else "rules/edit.html", context)


@staff_view("routing.change_routingrule")
@require_POST
def rule_toggle(request, pk: int) -> HttpResponse:
    config_toggle(request, obj=get_object_or_404(RoutingRule, pk=pk))
    return _list_or_redirect(request)


@staff_view("routing.delete_routingrule")
def rule_delete(request, pk: int) -> HttpResponse:
    rule = get_object_or_404(RoutingRule, pk=pk)
    return config_delete(
        request, obj=rule, title="Routing rule", success_url=reverse("rule_list"), nav="rules", snapshot=rule_snapshot
    )


@staff_view("routing.change_routingrule")
@require_POST
def rule_move(request, pk: int) -> HttpResponse:
    """Swap the rule with its neighbour above (`direction=up`) or below; renumber 10, 20, 30..."""
    rules = list(RoutingRule.objects.order_by("position", "id"))
    index = next((i for i, r in enumerate(rules) if r.pk == pk), None)
    if index is None:
        return HttpResponse(status=404)
    other = index - 1 if request.POST.get("direction") == "up" else index + 1
    if 0 <= other < len(rules):
        before = [r.name for r in rules]
        rules[index], rules[other] = rules[other], rules[index]
        with transaction.atomic():
            for number, rule in enumerate(rules, start=1):
                if rule.position != number * POSITION_STEP:
                    RoutingRule.objects.filter(pk=rule.pk).update(position=number * POSITION_STEP)
            AuditEntry.record(
                actor=actor(request),
                action=AuditAction.REORDER,
                obj=rules[other],
                object_repr=rules[other].name,
                before={"order": before},
                after={"order": [r.name for r in rules]},
                request=request,
            )
    return _list_or_redirect(request)


@staff_view("routing.view_routingrule", "routing.view_study")
def rule_dry_run(request) -> HttpResponse:
    """Every rule against a chosen study, or the most recent ones: matched or not, per condition, with the value seen."""
    form = DryRunForm(request.GET or None)
    studies: list[Study] = []
    if form.is_valid() and form.cleaned_data.get("study"):
        studies = Study.objects.by_reference(form.cleaned_data["study"])[:DRY_RUN_STUDIES]
        if not studies:
            form.add_error("study", UNKNOWN_STUDY)
    elif form.is_bound and not form.is_valid():
        form.errors["study"] = form.error_class([UNKNOWN_STUDY])
    else:
        studies = list(Study.objects.order_by("-first_received_at", "-id")[:DRY_RUN_STUDIES])
    explanations = [study_explain_routing(study=study) for study in studies]
    context = {"nav": "rules", "form": form, "explanations": explanations}
    return render_page(request, "rules/dry_run.html", context, fragment="results")


def rule_snapshot(rule: RoutingRule) -> dict:
    snapshot = config_snapshot(rule)
    snapshot["conditions"] = [str(c) for c in rule.conditions.all()]
    snapshot["destinations"] = sorted(rule.destinations.values_list("name", flat=True))
    return snapshot


def _list_or_redirect(request) -> HttpResponse:
    if request.htmx:
        return rule_list(request)
    return redirect("rule_list")
