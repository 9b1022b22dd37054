"""The shapes of the API's answers, for the OpenAPI schema and for checking what we send.

`StudyStatus` describes `study_status_data()` (pacslens/ops/study_status.py), the one serializer
of a study that `manage.py study_status --json` prints too: the API validates that dict against
this schema, it does not build its own.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from ninja import Schema
from pydantic import BaseModel, ConfigDict, Field

# The study_status document's timestamps: kept as the serializer wrote them (isoformat, to the
# microsecond), so the API and `study_status --json` give the same bytes.
IsoDateTime = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class Problem(Schema):
    type: str
    title: str
    status: int
    detail: str
    instance: str
    field: str | None = None
    errors: list[dict[str, str]] | None = None


# --- studies ----------------------------------------------------------------------------------


class StudySummary(Schema):
    id: int
    study_instance_uid: str
    state: str
    priority: str
    accession_number: str
    modalities: list[str]
    sending_ae_title: str
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    flagged: bool = False
    url: str


class StudyPage(Schema):
    items: list[StudySummary]
    next_cursor: str | None
    next: str | None


class StatusPart(BaseModel):
    # study_status --json only ever adds keys: one this schema does not name yet passes through
    # (a plain pydantic model: ninja's Schema reads only the fields it declares).
    model_config = ConfigDict(extra="allow")


class SeriesStatus(StatusPart):
    series_instance_uid: str
    modality: str
    body_part_examined: str
    series_description: str
    instance_count: int
    bytes: int


class TimelineEvent(StatusPart):
    at: IsoDateTime
    kind: str
    from_state: str
    to_state: str
    detail: str
    seconds_since_previous: float | None


class RoutingStatus(StatusPart):
    decided_at: IsoDateTime
    matched_rules: list[str]
    models: list[str]
    priority: str | int
    reason: str


class ResultStatus(StatusPart):
    id: int
    created_at: IsoDateTime
    model: str
    model_version: str
    model_sha256: str
    shadow: bool = False
    status: str
    score: float | None
    flagged: bool | None
    label: str
    key_region: dict[str, Any] | None = None
    failure_reason: str | None
    message: str
    series_instance_uid: str
    instance_count: int | None
    load_seconds: float | None
    preprocess_seconds: float | None
    infer_seconds: float | None
    supersedes: int | None
    current: bool
    demonstration: bool
    uid: str


class AttemptStatus(StatusPart):
    number: int
    started_at: IsoDateTime
    ended_at: IsoDateTime
    outcome: str
    code: str | None
    message: str


class DeliveryStatus(StatusPart):
    id: int
    result: int
    destination: str
    kind: str
    idempotency_key: str
    state: str
    attempts: int
    next_attempt_at: IsoDateTime | None
    next_try_at: IsoDateTime | None = None
    held_by_breaker: bool = False
    delivered_at: IsoDateTime | None
    last_error: str | None
    last_error_class: str | None
    attempt_log: list[AttemptStatus]


class StudyStatus(StatusPart):
    study_instance_uid: str
    internal_id: int
    state: str
    priority: str
    accession_number: str
    modalities: list[str]
    sending_ae_title: str
    first_received_at: IsoDateTime
    last_received_at: IsoDateTime
    completed_at: IsoDateTime | None
    series_count: int
    instance_count: int
    series: list[SeriesStatus]
    timeline: list[TimelineEvent]
    routing: RoutingStatus | None
    results: list[ResultStatus]
    deliveries: list[DeliveryStatus]
    installation: str


# --- actions ----------------------------------------------------------------------------------


class ActionOutcome(Schema):
    detail: str
    queued: int = 0
    ids: list[int] = []


class DiscardIn(Schema):
    reason: str


class RetryIn(Schema):
    destination: int | None = None
    deliveries: list[int] | None = None


class DeliveryRow(Schema):
    id: int
    study_id: int
    result_id: int
    destination_id: int
    destination: str
    kind: str
    idempotency_key: str
    state: str
    attempts: int
    last_error: str
    last_error_class: str
    created_at: datetime
    delivered_at: datetime | None
    discarded_by: str
    discard_reason: str


class RetrieveRow(Schema):
    id: int
    source: str
    study_instance_uid: str
    state: str
    attempts: int
    last_status: int | None
    last_error: str
    found_at: datetime
    finished_at: datetime | None


class FailingSource(Schema):
    id: int
    name: str
    kind: str
    consecutive_failures: int
    next_poll_at: datetime
    last_poll_status: str | None
    last_poll_started_at: datetime | None
    last_poll_error: str


# --- results ----------------------------------------------------------------------------------


class ResultRow(Schema):
    id: int
    created_at: datetime
    study_id: int
    model: str
    model_version: str
    model_sha256: str
    shadow: bool
    status: str
    score: float | None
    flagged: bool | None
    label: str
    supersedes: int | None
    current: bool


class ResultPage(Schema):
    items: list[ResultRow]
    next_cursor: str | None
    next: str | None


# --- configuration ----------------------------------------------------------------------------


class ConfigObject(Schema):
    id: int
    etag: str
    entry: dict[str, Any]


class ImportSummary(Schema):
    dry_run: bool
    sections: dict[str, dict[str, int]]


class RoutingVerdict(Schema):
    rule: str
    matched: bool
    counts: bool
    skipped: str
    conditions: list[str]


class DryRun(Schema):
    study_id: int
    reason: str
    verdicts: list[RoutingVerdict]


# --- operations -------------------------------------------------------------------------------


class Health(Schema):
    status: str
    checks: dict[str, dict[str, Any]]
    queue: dict[str, Any]


# --- webhooks ---------------------------------------------------------------------------------


class Webhook(Schema):
    id: int
    name: str
    events: list[str]
    enabled: bool
    url_set: bool = Field(description="The URL is write-only: whether one is stored")
    created_at: datetime
    updated_at: datetime
    last_sent_at: datetime | None
    last_error: str
    etag: str
    secret: str | None = Field(
        None, description="The signing secret: only in the answer that made it (create, or rotate_secret)"
    )


class WebhookIn(Schema):
    name: str
    url: str = Field(description="http(s) URL the workers POST to (write-only)")
    events: list[str] | None = Field(None, description="Default: every event type")
    enabled: bool = True
    secret: str | None = Field(None, description="At least 16 characters; omitted: one is made and answered once")


class WebhookPatch(Schema):
    name: str | None = None
    url: str | None = None
    events: list[str] | None = None
    enabled: bool | None = None
    secret: str | None = None
    rotate_secret: bool = Field(False, description="Make a new signing secret (answered once)")


class WebhookEventRow(Schema):
    event_id: str
    type: str
    state: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    sent_at: datetime | None
    last_error: str


# --- tests and assessment ----------------------------------------------------------------------


class ProbeOutcome(Schema):
    status: str = Field(description="success, failed or inconclusive")
    ok: bool | None
    name: str = Field(description="What was asked: C-ECHO, QIDO-RS, FHIR metadata, MLLP connect")
    summary: str
    code: str = Field(description="The peer's DICOM status, association rejection or HTTP status")
    reason: str = Field(description="Why it failed, in words to act on")
    details: list[str]
    seconds: float
    tested_at: datetime
    in_words: str = Field(description="The line the Test button shows")


class AssessmentProbe(Schema):
    name: str
    ok: bool | None
    summary: str
    details: list[str]


class AssessmentPattern(Schema):
    name: str
    usable: bool | None
    why: str


class Assessment(Schema):
    node: str
    endpoints: list[str]
    probes: list[AssessmentProbe]
    ingestion: list[AssessmentPattern]
    results: list[AssessmentPattern]
    it_actions: list[str]
    answers: list[dict[str, str]]
    report: str


# --- STOW-RS senders ---------------------------------------------------------------------------


class StowSender(Schema):
    id: int
    name: str
    ae_title: str | None
    token_hint: str
    active: bool
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class StowSenderCreated(StowSender):
    token: str = Field(description="The sender's bearer token: shown in this answer only")


class StowSenderIn(Schema):
    name: str = Field(description="An AE title (at most 16 characters), recorded as the calling AE")
    ae_title: str | None = Field(default=None, description="Link to this existing AE title")


class CodingProfileObject(Schema):
    id: int = Field(description="The destination's id")
    etag: str
    stored: bool = Field(description="False while the destination sends the defaults")
    entry: dict[str, Any]


# --- alerts -----------------------------------------------------------------------------------


class AlertActive(Schema):
    rule: str
    condition: str
    subject: str
    message: str
    started_at: datetime


class AlertNotificationRow(Schema):
    channel: str
    state: str
    last_error: str


class AlertEventRow(Schema):
    id: int
    at: datetime
    kind: str = Field(description="started or cleared")
    condition: str
    rule: str | None
    subject: str
    title: str
    text: str
    notifications: list[AlertNotificationRow]


class AlertTestOutcome(Schema):
    channel: str
    sent: bool
    error: str
