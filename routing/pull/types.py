"""Values shared by the pull protocols (DIMSE, DICOMweb) and the poll orchestration."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from django.utils import timezone


class PullError(Exception):
    """A query or retrieve could not be done. The message is shown to staff: never patient data."""

    def __init__(self, message: str, *, status: int | None = None, permanent: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.permanent = permanent


@dataclass(frozen=True)
class FoundStudy:
    study_instance_uid: str
    study_datetime: datetime | None = None
    instances: int | None = None
    modalities: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RetrieveOutcome:
    """The final answer of one retrieve: the DIMSE (or HTTP) status and the sub-operation counts."""

    ok: bool
    status: int | None
    completed: int = 0
    failed: int = 0
    warning: int = 0
    error: str = ""
    permanent: bool = False


def parse_study_datetime(study_date: str, study_time: str) -> datetime | None:
    """Study Date/Time (DA, TM) as an aware datetime in the site's time zone, or None."""
    study_date = (study_date or "").strip()
    if len(study_date) != 8 or not study_date.isdigit():
        return None
    digits = "".join(ch for ch in (study_time or "").split(".")[0] if ch.isdigit())[:6].ljust(6, "0")
    try:
        naive = datetime.strptime(study_date + digits, "%Y%m%d%H%M%S")
    except ValueError:
        try:
            naive = datetime.strptime(study_date, "%Y%m%d")
        except ValueError:
            return None
    return timezone.make_aware(naive, timezone.get_default_timezone())
