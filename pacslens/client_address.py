"""The client's address behind a reverse proxy, for login throttling (django-axes).

X-Forwarded-For is believed only when the connection comes from a configured proxy
(PACSLENS_TRUSTED_PROXIES): anyone else could write any address in it and dodge the lockout.
The header is read from the right (nginx's $proxy_add_x_forwarded_for appends what it saw), and
the first address that is not itself a trusted proxy is the client.
"""

from __future__ import annotations

import ipaddress

from django.conf import settings
from django.http import HttpRequest


def client_address(request: HttpRequest) -> str:
    remote = request.META.get("REMOTE_ADDR", "")
    if not _trusted(remote):
        return remote
    hops = [h.strip() for h in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop):
            return hop if _is_address(hop) else remote
    return hops[0] if hops and _is_address(hops[0]) else remote


def _trusted(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in settings.TRUSTED_PROXIES)


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
