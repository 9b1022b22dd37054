"""Create / edit / enable-disable for configuration objects, audited with before/after snapshots.

AE titles, destinations and poll sources share these helpers; their views only say which form,
which permission and where to go afterwards.
"""

from __future__ import annotations

from django.contrib import messages
from django.db import models, transaction
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django_htmx.http import HttpResponseClientRedirect

from pacslens.staff.views.access import actor
from routing.models import AuditAction, AuditEntry
from routing.models.audit import config_snapshot


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
    form = form_class(request.POST or None, instance=instance, **(form_kwargs or {}))
    if request.method == "POST" and form.is_valid():
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
        if request.htmx:
            return HttpResponseClientRedirect(success_url)
        return redirect(success_url)
    context = {
        "form": form,
        "title": title,
        "instance": instance,
        "creating": creating,
        "cancel_url": success_url,
        "nav": nav,
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
