"""The one answer type of every network probe (the endpoint Test buttons and `manage.py assess`)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_TIMEOUT = 5.0  # seconds: the Test buttons' timeout, when the endpoint sets none


@dataclass
class ProbeResult:
    """One question and its answer. `ok` is None when the answer is inconclusive."""

    name: str
    ok: bool | None
    summary: str
    details: list[str] = field(default_factory=list)
    code: str = ""  # DICOM status, A-ASSOCIATE-RJ result/source/reason, or HTTP status
    reason: str = ""  # why it failed, in words the user can act on
    seconds: float = 0.0

    @property
    def took(self) -> str:
        return f"{self.seconds * 1000:.0f} ms"

    def in_words(self) -> str:
        """One line for a person: what was found, the peer's code and why (as the Test button shows it)."""
        return " · ".join(part for part in (self.summary, self.code, self.reason) if part)[:500]

    def audit_text(self) -> str:
        return f"{'ok' if self.ok else 'failed'} {self.code} {self.reason or self.summary}".strip()[:500]

    def as_dict(self) -> dict:
        """The keys of `manage.py assess --json`."""
        return {"name": self.name, "ok": self.ok, "summary": self.summary, "details": self.details}
