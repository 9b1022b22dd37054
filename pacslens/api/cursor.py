"""Keyset (cursor) pagination: stable while rows are added.

The cursor names the last row of a page by its sort key and id; the next page is everything after
that key. Rows added meanwhile (newer, so before the first page) never shift a page or repeat a
row, which an offset would.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime

from django.db.models import Q, QuerySet

from pacslens.api.problems import Problem

MAX_LIMIT = 200


def cursor_encode(at: datetime, pk: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([at.isoformat(), pk]).encode()).decode().rstrip("=")


def cursor_page(queryset: QuerySet, *, field: str, cursor: str | None, limit: int) -> tuple[list, str | None]:
    """One page of `queryset` in (-field, -id) order after `cursor`, and the next page's cursor."""
    if not 1 <= limit <= MAX_LIMIT:
        raise Problem(
            422, f"limit must be between 1 and {MAX_LIMIT}.", errors=[("limit", f"Between 1 and {MAX_LIMIT}.")]
        )
    queryset = queryset.order_by(f"-{field}", "-id")
    if cursor:
        at, pk = _decode(cursor)
        queryset = queryset.filter(Q(**{f"{field}__lt": at}) | Q(**{field: at, "id__lt": pk}))
    rows = list(queryset[: limit + 1])
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], cursor_encode(getattr(last, field), last.pk)


def _decode(cursor: str) -> tuple[datetime, int]:
    try:
        at, pk = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(at), int(pk)
    except (ValueError, TypeError):
        raise Problem(
            422, "The cursor is not one this API gave out.", errors=[("cursor", "Use next_cursor from a page.")]
        ) from None
