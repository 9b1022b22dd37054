"""The Webhooks page (PACS administrators, like destinations and alerts: another place results
go): subscriptions, their signing secret shown once when made, and the events recently sent with
their state, so a receiver that keeps failing is seen. Sending lives in results/deliver/webhooks.py."""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.views.decorators.cache import never_cache

from pacslens.staff.views.access import actor, render_page, staff_view
from pacslens.staff.webhook_forms import WebhookSubscriptionForm
from results.deliver.webhooks import webhook_subscription_save
from results.models import WebhookEvent, WebhookSubscription

RECENT_EVENTS = 50
VIEW = ("results.view_webhooksubscription",)
EDIT = ("results.view_webhooksubscription", "results.add_webhooksubscription", "results.change_webhooksubscription")


@never_cache
@staff_view(*VIEW)
def webhook_page(request) -> HttpResponse:
    return _page(request)


@never_cache
@staff_view(*EDIT)
def webhook_edit(request, pk: int | None = None) -> HttpResponse:
    instance = get_object_or_404(WebhookSubscription, pk=pk) if pk else WebhookSubscription()
    form = WebhookSubscriptionForm(request.POST or None, instance=instance)
    if request.method == "POST" and form.is_valid():
        subscription = form.save(commit=False)
        try:
            secret = webhook_subscription_save(
                subscription=subscription,
                actor=actor(request),
                rotate_secret=bool(form.cleaned_data.get("rotate_secret")),
                request=request,
            )
        except ValidationError as exc:
            for field, errors in exc.message_dict.items():
                for error in errors:
                    form.add_error(field if field in form.fields else None, error)
        else:
            if secret:
                # Shown once, on this answer only (never_cache); the database keeps it sealed.
                return _page(request, new_secret=secret, saved=subscription)
            messages.success(request, f"Webhook {subscription.name} saved.")
            return redirect("webhook_page")
    return _page(request, form=form, editing=instance)  # errors inline, 200 as the other config forms


def _page(request, *, form=None, editing=None, new_secret: str = "", saved=None, status: int = 200) -> HttpResponse:
    context = {
        "nav": "webhooks",
        "subscriptions": WebhookSubscription.objects.all(),
        "events": WebhookEvent.objects.select_related("subscription")[:RECENT_EVENTS],
        "form": form,
        "editing": editing,
        "new_secret": new_secret,
        "saved": saved,
    }
    return render_page(request, "webhooks/page.html", context, fragment="events", status=status)
