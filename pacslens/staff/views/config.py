"""Create / edit / enable-disable / delete for configuration objects, audited with before/after snapshots.

AE titles, destinations and poll sources share these helpers; their views only say which form,
which permission and where to go afterwards.
"""

from __future__ import annotations

import json

from django import forms
from django.contrib import messages
from django.db import models, transaction
from django.http import HttpResponse, QueryDict
from django.shortcuts import redirect, render
from django_htmx.http import HttpResponseClientRedirect

from pacslens.staff.views.access import actor
from routing.models import AuditAction, AuditEntry
from routing.models.audit import config_snapshot

# Posted by the form's `refresh_field` (htmx on change, a button without JavaScript): show the
# form again for the new choice, keeping what was typed, without validating or saving.
REFRESH = "_refresh"


def config_edit(
    request,
    *,
    form_class,
    instance: models.Model | None,
    title: str,
    success_url: str,
    form_kwargs: dict | None = None,
    nav: str = "endpoints",
) -> HttpResponse:
    """GET: the form. POST: validate; errors inline in the same form (htmx swaps only the form),
    success saves, writes the audit row and goes back to the list."""
    creating = instance is None
    before = None if instance is None else config_snapshot(instance)
    refresh_field = getattr(form_class, "refresh_field", None)
    if request.method == "POST" and refresh_field and REFRESH in request.POST:
        form = form_class(initial=_typed_values(request.POST, form_class), instance=instance, **(form_kwargs or {}))
    else:
        form = form_class(request.POST or None, instance=instance, **(form_kwargs or {}))
    if request.method == "POST" and REFRESH not in request.POST and form.is_valid():
        with transaction.atomic():
            saved = form.save()
            AuditEntry.record(
                actor=actor(request),
                action=AuditAction.CREATE if creating else AuditAction.UPDATE,
                obj=saved,
                object_repr=str(saved),
                before=before,
                after=config_snapshot(saved),
                request=request,
            )
        messages.success(request, f"{title} {saved} {'created' if creating else 'saved'}.")
        for warning in getattr(form, "warnings", list)():
            messages.warning(request, warning)
        if request.htmx:
            return HttpResponseClientRedirect(success_url)
        return redirect(success_url)
    if refresh_field and refresh_field in form.fields:
        form.fields[refresh_field].widget.attrs.update(
            {
                "hx-post": request.get_full_path(),
                "hx-trigger": "change",
                "hx-target": "#config-form",
                "hx-swap": "outerHTML",
                "hx-vals": json.dumps({REFRESH: refresh_field}),
            }
        )
    context = {
        "form": form,
        "title": title,
        "instance": instance,
        "creating": creating,
        "cancel_url": success_url,
        "nav": nav,
        "refresh_field": refresh_field,
    }
    template = "ui/config_form.html#form" if request.htmx else "ui/config_form.html"
    return render(request, template, context)


def config_toggle(request, *, obj: models.Model, field: str = "enabled") -> None:
    before = config_snapshot(obj)
    setattr(obj, field, not getattr(obj, field))
    with transaction.atomic():
        obj.save(update_fields=[field])
        AuditEntry.record(
            actor=actor(request),
            action=AuditAction.ENABLE if getattr(obj, field) else AuditAction.DISABLE,
            obj=obj,
            object_repr=str(obj),
            before=before,
            after=config_snapshot(obj),
            request=request,
        )


def _typed_values(data: QueryDict, form_class) -> dict:
    """What the user typed, as `initial` for a form shown again (never a password)."""
    values: dict = {}
    for name, field in form_class.base_fields.items():
        if isinstance(field.widget, forms.PasswordInput):
            continue
        if isinstance(field.widget, forms.CheckboxInput):
            values[name] = name in data
        elif isinstance(field, forms.MultipleChoiceField | forms.ModelMultipleChoiceField):
            values[name] = data.getlist(name)
        elif name in data:
            values[name] = data[name]
    return values


def config_delete(request, *, obj, title: str, success_url: str, nav: str, snapshot=config_snapshot) -> HttpResponse:
    """GET: what will be deleted, with a confirm button (or why it cannot be). POST: delete it and
    write the audit row with its last configuration, unless something still refers to it."""
    blockers = obj.delete_blockers()
    if request.method == "POST" and not blockers:
        before = snapshot(obj)
        name, pk = str(obj), obj.pk
        with transaction.atomic():
            obj.delete()
            obj.pk = pk  # the audit row names what was deleted
            AuditEntry.record(
                actor=actor(request),
                action=AuditAction.DELETE,
                obj=obj,
                object_repr=name,
                before=before,
                request=request,
            )
        messages.success(request, f"{title} {name} deleted.")
        if request.htmx:
            return HttpResponseClientRedirect(success_url)
        return redirect(success_url)
    context = {"obj": obj, "title": title, "blockers": blockers, "cancel_url": success_url, "nav": nav}
    return render(request, "ui/confirm_delete.html", context, status=409 if request.method == "POST" else 200)
