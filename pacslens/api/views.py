"""The API clients page (superusers): create a client (its token is shown once), issue another
token, revoke a token or a whole client. A staff page, so it is a session-and-CSRF form like the
others; it lives here because it manages this package's rows."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from pacslens.api.models import ApiClient, ApiRole, ApiToken
from pacslens.api.services import api_client_create, api_client_revoke, api_token_issue, api_token_revoke
from pacslens.staff.views.access import actor, staff_view


class ApiClientForm(forms.Form):
    name = forms.CharField(max_length=64, help_text="Recorded as api:NAME in the audit log, e.g. mirth-ris")
    role = forms.ChoiceField(choices=ApiRole.choices, help_text="What the client may do: the staff role of that name")
    description = forms.CharField(max_length=200, required=False)
    expires_in_days = forms.IntegerField(
        min_value=1, required=False, label="Token expires after (days)", help_text="Empty: the token does not expire"
    )


@never_cache
@staff_view(superuser=True)
def api_clients(request) -> HttpResponse:
    form = ApiClientForm(request.POST or None)
    new_token = ""
    if request.method == "POST" and form.is_valid():
        try:
            _, new_token = api_client_create(**form.cleaned_data, actor=actor(request), request=request)
        except ValidationError as exc:
            for field, errors in exc.message_dict.items():
                for error in errors:
                    form.add_error(field if field in form.fields else None, error)
        else:
            form = ApiClientForm()
    return _page(request, form=form, new_token=new_token, status=422 if form.errors else 200)


@never_cache
@staff_view(superuser=True)
@require_POST
def api_client_token_issue(request, pk: int) -> HttpResponse:
    client = get_object_or_404(ApiClient, pk=pk)
    days = request.POST.get("expires_in_days", "").strip()
    try:
        _, token = api_token_issue(
            client=client, actor=actor(request), expires_in_days=int(days) if days.isdigit() else None, request=request
        )
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect("api_clients")
    return _page(request, form=ApiClientForm(), new_token=token)


@staff_view(superuser=True)
@require_POST
def api_client_revoke_view(request, pk: int) -> HttpResponse:
    client = get_object_or_404(ApiClient, pk=pk)
    if api_client_revoke(client=client, actor=actor(request), request=request):
        messages.success(request, f"Client {client.name} and all its tokens revoked.")
    return redirect("api_clients")


@staff_view(superuser=True)
@require_POST
def api_token_revoke_view(request, pk: int) -> HttpResponse:
    token = get_object_or_404(ApiToken.objects.select_related("client"), pk=pk)
    if api_token_revoke(token=token, actor=actor(request), request=request):
        messages.success(request, f"Token {token.token_hint}… of {token.client.name} revoked.")
    return redirect("api_clients")


def _page(request, *, form: ApiClientForm, new_token: str, status: int = 200) -> HttpResponse:
    context = {
        "nav": "api",
        "form": form,
        "new_token": new_token,
        "clients": ApiClient.objects.prefetch_related("tokens"),
    }
    return render(request, "api/clients.html", context, status=status)
