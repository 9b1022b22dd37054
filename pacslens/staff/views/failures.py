"""The failure queue: failed deliveries (filter by destination and error class; retry one, the
selected ones or all of a destination; discard with a reason) and failed studies.

Retried rows stay on the page ("watched", kept in the URL so it can be bookmarked and reloaded)
whatever the filter, until staff clear them: the table polls itself while any of them is pending
or in flight, so the informaticist sees each one go back to pending and then to delivered
without reloading. Every action answers with a message saying what it did.

PACS administrators see the queue read-only (they fix the endpoint); the buttons follow the
permissions, and the actions check them on the server.

Rows are grouped by kind (`queue_sections`): each kind has its own row template
(failures/rows/<kind>.html), so another kind of failed work can join the page.
"""

from __future__ import annotations

from urllib.parse import urlencode

from django.contrib import messages
from django.db.models import Count, Q
from django.http import HttpResponse, QueryDict
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from pacslens.staff.forms import DiscardForm
from pacslens.staff.views.access import actor, render_page, staff_view
from pacslens.staff.views.retrieves import retrieve_queue_context
from results.deliver.ledger import delivery_discard, delivery_retry
from results.models import Delivery, DeliveryState, Destination, ErrorClass
from routing.models import AuditAction, AuditEntry, Study, StudyState

MAX_ROWS = 200
POLL_SECONDS = 2
# The queue's delivery states: failed (the default), or the ones still waiting to be sent.
VIEWS = {"failed": [DeliveryState.FAILED], "waiting": [DeliveryState.PENDING, DeliveryState.IN_FLIGHT]}


@staff_view("results.view_delivery")
def failure_queue(request) -> HttpResponse:
    return _render_queue(request, request.GET)


@staff_view("results.view_delivery", "results.retry_delivery")
@require_POST
def failure_retry(request) -> HttpResponse:
    """POST `delivery` (one), `selected` (several) or `destination_all` (every failed row of one destination)."""
    post = request.POST
    failed = Delivery.objects.filter(state=DeliveryState.FAILED)
    destination = None
    if post.get("delivery"):
        rows, scope = failed.filter(pk=post["delivery"]), "one"
    elif post.get("destination_all"):
        destination = Destination.objects.filter(pk=post["destination_all"]).first()
        rows, scope = failed.filter(destination=destination), "all of a destination"
    else:
        rows, scope = failed.filter(pk__in=[v for v in post.getlist("selected") if v.isdigit()]), "selected"
    ids = list(rows.values_list("pk", flat=True))
    count = delivery_retry(deliveries=Delivery.objects.filter(pk__in=ids), actor=actor(request)) if ids else 0
    for delivery in Delivery.objects.filter(pk__in=ids).select_related("destination"):
        AuditEntry.record(
            actor=actor(request),
            action=AuditAction.RETRY,
            obj=delivery,
            object_repr=f"to {delivery.destination.name}",
            detail=f"retry {scope}",
            request=request,
        )
    text = _retry_message(count, destination)
    state = _queue_state(post, add_watch=ids)
    if request.htmx:
        response = _render_queue(request, state, message=text, message_level="success" if count else "warning")
        response["HX-Push-Url"] = f"{reverse('failure_queue')}?{state.urlencode()}"
        return response
    messages.add_message(request, messages.SUCCESS if count else messages.WARNING, text)
    return redirect(f"{reverse('failure_queue')}?{state.urlencode()}")


@staff_view("results.view_delivery", "results.discard_delivery")
def failure_discard(request, pk: int) -> HttpResponse:
    delivery = get_object_or_404(Delivery.objects.select_related("destination", "study"), pk=pk)
    form = DiscardForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        if delivery_discard(delivery=delivery, actor=actor(request), reason=form.cleaned_data["reason"]):
            AuditEntry.record(
                actor=actor(request),
                action=AuditAction.DISCARD,
                obj=delivery,
                object_repr=f"to {delivery.destination.name}",
                detail=f"reason: {form.cleaned_data['reason']}",
                request=request,
            )
            text, level = f"Delivery #{delivery.pk} to {delivery.destination.name} discarded.", "success"
        else:
            text, level = f"Delivery #{delivery.pk} was no longer failed or pending: nothing discarded.", "warning"
        state = _queue_state(request.POST)
        if request.htmx:
            response = _render_queue(request, state, message=text, message_level=level)
            response["HX-Retarget"], response["HX-Reswap"] = "#failure-table", "outerHTML"
            return response
        messages.add_message(request, messages.SUCCESS if level == "success" else messages.WARNING, text)
        return redirect(f"{reverse('failure_queue')}?{state.urlencode()}")
    context = {
        "delivery": delivery,
        "form": form,
        "state": _queue_state(request.POST or request.GET),
        "nav": "failures",
    }
    return render(request, "failures/discard.html#form" if request.htmx else "failures/discard.html", context)


def _retry_message(count: int, destination: Destination | None) -> str:
    if not count:
        return "Nothing to retry: the deliveries were no longer failed."
    where = f" to {destination.name}" if destination else ""
    return f"{count} deliver{'y' if count == 1 else 'ies'}{where} queued again; they stay listed until they settle."


def _render_queue(request, params: QueryDict, *, message: str = "", message_level: str = "success") -> HttpResponse:
    view = params.get("view", "") if params.get("view", "") in VIEWS else "failed"
    destination_id = params.get("destination", "")
    error_class = params.get("error_class", "")
    watch = _ids(params.get("watch", ""))
    deliveries = delivery_rows(view=view, destination_id=destination_id, error_class=error_class, watch=watch)
    in_progress = any(r.state in (DeliveryState.PENDING, DeliveryState.IN_FLIGHT) for r in deliveries if r.pk in watch)
    destination = Destination.objects.filter(pk=destination_id).first() if destination_id.isdigit() else None
    context = {
        "nav": "failures",
        "sections": [{"kind": "delivery", "title": "Deliveries", "rows": deliveries}],
        "rows": deliveries,
        "view": view,
        "views": [("failed", "failed"), ("waiting", "pending or in flight")],
        "destinations": Destination.objects.all(),
        "failed_by_destination": failed_by_destination(),
        "error_classes": ErrorClass.choices,
        "destination": destination,
        "error_class": error_class,
        "watch": ",".join(map(str, sorted(watch))),
        "polling": in_progress,
        "poll_seconds": POLL_SECONDS,
        "failed_count": sum(1 for r in deliveries if r.state == DeliveryState.FAILED),
        "message": message,
        "message_level": message_level,
        "query": urlencode(
            {
                k: v
                for k, v in {
                    "view": "" if view == "failed" else view,
                    "destination": destination_id,
                    "error_class": error_class,
                    "watch": ",".join(map(str, sorted(watch))),
                }.items()
                if v
            }
        ),
        "failed_studies": Study.objects.filter(state=StudyState.FAILED).order_by("-state_changed_at")[:50],
        **retrieve_queue_context(request),  # failed pulls: their own section (failures/retrieves.html)
    }
    return render_page(request, "failures/queue.html", context, fragment="table")


def delivery_rows(*, view: str, destination_id: str, error_class: str, watch: set[int]) -> list[Delivery]:
    """The deliveries the filter selects, plus every watched (retried) one whatever the filter."""
    selected = Q(state__in=VIEWS[view])
    if destination_id.isdigit():
        selected &= Q(destination_id=destination_id)
    if error_class in ErrorClass.values:
        selected &= Q(last_error_class=error_class)
    return list(
        Delivery.objects.filter(selected | Q(pk__in=watch))
        .select_related("destination", "study", "result")
        .order_by("created_at", "pk")[:MAX_ROWS]
    )


def failed_by_destination() -> list[dict]:
    """Each destination with failed deliveries and how many: the per-destination Retry all buttons."""
    rows = (
        Delivery.objects.filter(state=DeliveryState.FAILED)
        .values("destination_id", "destination__name")
        .annotate(failed=Count("id"))
        .order_by("destination__name")
    )
    return [{"id": r["destination_id"], "name": r["destination__name"], "failed": r["failed"]} for r in rows]


def _queue_state(params: QueryDict, *, add_watch: list[int] | None = None) -> QueryDict:
    state = QueryDict(mutable=True)
    for key in ("view", "destination", "error_class"):
        if value := params.get(key):
            state[key] = value
    watch = _ids(params.get("watch", "")) | set(add_watch or [])
    if watch:
        state["watch"] = ",".join(map(str, sorted(watch)))
    return state


def _ids(text: str) -> set[int]:
    return {int(part) for part in text.split(",") if part.strip().isdigit()}
