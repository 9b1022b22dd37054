"""Access checks and the one-view-two-renderings helper shared by every staff page.

Every view and every htmx fragment goes through `staff_view`: anonymous users go to the login
page (an htmx request gets `HX-Redirect`, so a fragment never swaps a login form into a table),
and a logged-in user without the permission gets 403, whatever the template shows.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import TypeVar

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import render, resolve_url
from django_htmx.http import HttpResponseClientRedirect

# A view returns its own response type (HttpResponse, StreamingHttpResponse...); the wrapper
# adds the login redirect, an HttpResponse.
R = TypeVar("R", bound=HttpResponseBase)


def staff_view(
    *permissions: str, superuser: bool = False
) -> Callable[[Callable[..., R]], Callable[..., R | HttpResponse]]:
    """Login required; then every permission in `permissions` (or superuser status) or 403."""

    def decorator(view: Callable[..., R]) -> Callable[..., R | HttpResponse]:
        @wraps(view)
        def wrapped(request: HttpRequest, *args, **kwargs) -> R | HttpResponse:
            user = request.user
            if not user.is_authenticated:
                if getattr(request, "htmx", False):
                    return HttpResponseClientRedirect(f"{resolve_url(settings.LOGIN_URL)}?next={request.path}")
                return redirect_to_login(request.get_full_path())
            if superuser and not user.is_superuser:
                raise PermissionDenied("This page is for superusers.")
            if permissions and not user.has_perms(permissions):
                raise PermissionDenied("Your role does not allow this.")
            return view(request, *args, **kwargs)

        wrapped.staff_permissions = permissions  # type: ignore[attr-defined]
        wrapped.staff_superuser = superuser  # type: ignore[attr-defined]
        return wrapped

    return decorator


def render_page(
    request: HttpRequest, template: str, context: dict, *, fragment: str, status: int = 200
) -> HttpResponse:
    """The whole page, or only its `fragment` partial for an htmx request (NetBox's pattern)."""
    htmx = getattr(request, "htmx", None)
    if htmx and not htmx.boosted:
        return render(request, f"{template}#{fragment}", context, status=status)
    return render(request, template, context, status=status)


def actor(request: HttpRequest) -> str:
    return request.user.get_username()
