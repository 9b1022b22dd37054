"""Log formatting: plain lines for humans, JSON lines for log shippers, with context ids.

Named `logs`, not `logging`, so it never shadows the standard library module.

Context: a web request's id (set by pacslens.middleware.RequestIdMiddleware in a contextvar) and,
in the listener, the association a line belongs to. pynetdicom runs each association in its own
thread (an `Association`, with a `DULServiceProvider` thread beside it), so the filter finds
the association from the current thread: no handler has to set anything, and the cost is one
isinstance check per log record.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("pacslens_request_id", default="")

# Standard LogRecord attributes: everything else on a record is an `extra` worth shipping.
_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "context",
    "request_id",
    "association_id",
}


class ContextFilter(logging.Filter):
    """Adds `request_id`, `association_id` and a ready-made ` [..]` `context` suffix to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = record.request_id = request_id_var.get()
        association_id = record.association_id = association_log_id()
        parts = []
        if request_id:
            parts.append(f"request {request_id}")
        if association_id:
            parts.append(f"association {association_id}")
        record.context = f" [{', '.join(parts)}]" if parts else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, process, message, ids, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key in ("request_id", "association_id"):
            value = getattr(record, key, "")
            if value:
                entry[key] = value
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = _plain_value(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _plain_value(value: object) -> object:
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if hasattr(value, "method") and hasattr(value, "path"):
        # An HttpRequest (Django's 4xx/5xx lines): its repr has the query string, which may
        # hold a search term typed by staff. Method and path only.
        return f"{value.method} {value.path}"
    return type(value).__name__


def association_log_id() -> str:
    """The id of the association the current thread serves, or "" outside one.

    The database id (StoreAssociation, the one study_status and the UI show) once the first
    C-STORE created the row; before that (C-ECHO, negotiation, rejection) a short random id
    kept on the association object.
    """
    thread = threading.current_thread()
    # An Association carrying our own ad-hoc attributes.
    assoc: Any = getattr(thread, "assoc", None) if type(thread).__name__ == "DULServiceProvider" else thread
    if type(assoc).__name__ != "Association":
        return ""
    row_id = getattr(assoc, "_pacslens_association_id", None)
    if row_id is not None:
        return str(row_id)
    log_id = getattr(assoc, "_pacslens_log_id", None)
    if log_id is None:
        log_id = assoc._pacslens_log_id = "a" + uuid.uuid4().hex[:8]
    return log_id
