"""Pull ingestion and DICOMweb receive: poll sources, their polls and retrieves, STOW-RS senders.

A PollSource is a PACS we query (DIMSE C-FIND + C-MOVE/C-GET, or QIDO-RS + WADO-RS). Its
`lease_until` is the claim: a worker polls a source only after a conditional UPDATE set the
lease, so two workers never poll one source at once. Each poll writes a Poll row (counts and a
patient-free error), and each study found gets one StudyRetrieve row per source: that row,
unique on (source, study UID), is what makes a study retrieved once however often we re-poll.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from datetime import datetime, timedelta

from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.db.models import Q
from django.utils import timezone
from pydicom.datadict import dictionary_VR, tag_for_keyword

from routing.models.access_audit import access_change_record, access_snapshot
from routing.models.core import ApplicationEntity, Study
from routing.models.fields import NameField
from routing.models.oauth import HttpClientAuth
from routing.validators import validate_ae_title


def validate_extra_filters(value: object) -> None:
    if not isinstance(value, dict):
        raise ValidationError("must be a mapping of DICOM keyword: value")
    for keyword, match in value.items():
        tag = tag_for_keyword(str(keyword))
        if tag is None:
            raise ValidationError(f"{keyword!r} is not a DICOM keyword (use e.g. StudyDescription)")
        if dictionary_VR(tag) == "SQ":
            raise ValidationError(f"{keyword!r} is a sequence; only plain attributes can be matched")
        if not isinstance(match, str):
            raise ValidationError(f"the value for {keyword!r} must be a string (DICOM matching syntax)")


def validate_modalities(value: str) -> None:
    for modality in modalities_list(value):
        if not modality.isalnum() or len(modality) > 16:
            raise ValidationError(f"{modality!r} is not a modality code (use e.g. CT\\MR)")


# A poll source may read its DICOMweb token only from variables under this prefix, which no
# setting uses: naming any variable would let whoever edits a source send DATABASE_URL or the
# secret key to a server of their choice (the Test button and every poll send it as a token).
POLL_TOKEN_ENV_PREFIX = "PACSLENS_POLL_TOKEN_"
_POLL_TOKEN_ENV = re.compile(re.escape(POLL_TOKEN_ENV_PREFIX) + r"[A-Z0-9_]+")


def validate_poll_token_env(value: str) -> None:
    if value and not _POLL_TOKEN_ENV.fullmatch(value):
        raise ValidationError(
            f"the token's variable must be named {POLL_TOKEN_ENV_PREFIX}<NAME> (capitals, digits, _), "
            "e.g. PACSLENS_POLL_TOKEN_VNA; no other variable can be read"
        )


def modalities_list(value: str) -> list[str]:
    return [m.strip().upper() for m in value.replace(",", "\\").split("\\") if m.strip()]


class PollSource(HttpClientAuth):
    class Kind(models.TextChoices):
        DIMSE = "dimse", "DIMSE (C-FIND + C-MOVE/C-GET)"
        DICOMWEB = "dicomweb", "DICOMweb (QIDO-RS + WADO-RS)"

    class RetrieveMode(models.TextChoices):
        C_MOVE = "c-move", "C-MOVE to our listener"
        C_GET = "c-get", "C-GET on the query association"

    name = NameField(max_length=50, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.DIMSE)
    enabled = models.BooleanField(default=True)
    pacs = models.ForeignKey(
        ApplicationEntity,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        help_text="DIMSE: the PACS to query (needs 'may query'; for C-MOVE also 'may send', it stores to us)",
    )
    retrieve_mode = models.CharField(max_length=8, choices=RetrieveMode.choices, default=RetrieveMode.C_MOVE)
    move_destination = models.CharField(
        max_length=16,
        blank=True,
        validators=[validate_ae_title],
        help_text="C-MOVE destination AE title (empty: our own, PACSLENS_AE_TITLE); the PACS must know it",
    )
    dicomweb_url = models.URLField(blank=True, help_text="DICOMweb base URL, e.g. https://pacs/dicom-web")
    dicomweb_token_env = models.CharField(
        max_length=64,
        blank=True,
        help_text="Name of the environment variable holding the bearer token (the token itself is never stored)",
    )  # validated in clean(): validate_poll_token_env
    interval_seconds = models.PositiveIntegerField(default=60, help_text="Time between two polls")
    modalities = models.CharField(
        max_length=64, blank=True, validators=[validate_modalities], help_text="e.g. CT\\MR; empty: all"
    )
    lookback_hours = models.PositiveIntegerField(
        default=24, help_text="Each poll asks for studies dated from this long before the last good poll"
    )
    extra_filters = models.JSONField(
        default=dict, blank=True, validators=[validate_extra_filters], help_text="DICOM keyword: match value"
    )
    max_studies_per_poll = models.PositiveIntegerField(default=10, help_text="Retrieves started by one poll")
    max_concurrent_retrieves = models.PositiveIntegerField(default=1)
    min_query_spacing_seconds = models.PositiveIntegerField(
        default=5, help_text="Never send two queries to this PACS closer together than this"
    )
    # Worker state, not configuration (not in the YAML export).
    next_poll_at = models.DateTimeField(default=timezone.now)
    lease_until = models.DateTimeField(null=True, blank=True)
    leased_by = models.CharField(max_length=100, blank=True)
    last_query_at = models.DateTimeField(null=True, blank=True)
    watermark = models.DateTimeField(null=True, blank=True, help_text="Start of the last successful poll")
    consecutive_failures = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        indexes = [models.Index(fields=["next_poll_at"], name="pollsource_due_idx", condition=Q(enabled=True))]

    # Where the OAuth client secret goes, and where its tokens go (HttpClientAuth.TARGET_FIELDS).
    TARGET_FIELDS = ("kind", "dicomweb_url", *HttpClientAuth.TARGET_FIELDS)

    def __str__(self) -> str:
        return self.name

    @property
    def uses_oauth(self) -> bool:
        """DICOMweb with OAuth 2.0 client credentials: a token URL is set."""
        return self.kind == self.Kind.DICOMWEB and bool(self.oauth_token_url)

    def clean(self) -> None:
        if self.kind == self.Kind.DIMSE:
            pacs = self.pacs  # may be an unsaved AE while a YAML file is validated
            if pacs is None:
                raise ValidationError({"pacs": "a DIMSE poll source needs the PACS's AE title"})
            if not pacs.may_query:
                raise ValidationError({"pacs": f"{pacs.ae_title} is not marked 'may query'"})
        elif not self.dicomweb_url:
            raise ValidationError({"dicomweb_url": "a DICOMweb poll source needs the base URL"})
        if self.max_concurrent_retrieves < 1 or self.max_studies_per_poll < 1:
            raise ValidationError("max_studies_per_poll and max_concurrent_retrieves must be at least 1")
        if self.interval_seconds < 1:
            raise ValidationError({"interval_seconds": "must be at least 1 second"})
        try:
            validate_poll_token_env(self.dicomweb_token_env)
        except ValidationError as exc:
            raise ValidationError({"dicomweb_token_env": exc.messages}) from None
        if self.kind == self.Kind.DICOMWEB:
            oauth = self.uses_oauth or bool(self.oauth_client_id)
            errors = self.oauth_problems(required=oauth)
            if oauth and self.dicomweb_token_env:
                errors["dicomweb_token_env"] = "Use either a token variable or OAuth client credentials, not both."
            if errors:
                raise ValidationError(errors)

    def dicomweb_token(self) -> str:
        """The bearer token from the environment, "" when none is configured or the variable is unset.

        Checked again here, not only when saved: a row written before the prefix rule (or by a
        queryset update) must not read another variable. Raises ValidationError."""
        if not self.dicomweb_token_env:
            return ""
        validate_poll_token_env(self.dicomweb_token_env)
        return os.environ.get(self.dicomweb_token_env, "")

    @property
    def modality_list(self) -> list[str]:
        return modalities_list(self.modalities)

    @property
    def label(self) -> str:
        """What we record as the calling AE title of what this source delivers (max 16 chars)."""
        if self.kind == self.Kind.DIMSE and self.pacs is not None:
            return self.pacs.ae_title
        return self.name[:16].upper()


class Poll(models.Model):
    """One query (C-FIND or QIDO-RS) and the retrieves it started. Never patient data in `error`."""

    class Status(models.TextChoices):
        RUNNING = "running", "Running"
        OK = "ok", "OK"
        PARTIAL = "partial", "Some retrieves failed"
        FAILED = "failed", "Failed"

    source = models.ForeignKey(PollSource, on_delete=models.CASCADE, related_name="polls")
    kind = models.CharField(max_length=16, default="poll", help_text="poll or backfill")
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    window_from = models.DateTimeField(null=True, blank=True)
    window_to = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    matches = models.PositiveIntegerField(default=0)
    new = models.PositiveIntegerField(default=0, help_text="Studies not seen before")
    retrieved = models.PositiveIntegerField(default=0)
    retrieve_failures = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-started_at", "-id"]
        indexes = [models.Index(fields=["source", "started_at"])]

    def __str__(self) -> str:
        return f"Poll {self.pk} of {self.source_id} ({self.status})"


class StudyRetrieve(models.Model):
    """One study found on one source: retrieved once, retried with backoff until it is done."""

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        RETRIEVING = "retrieving", "Retrieving"
        DONE = "done", "Done"
        FAILED = "failed", "Failed (no more automatic retries)"
        DISCARDED = "discarded", "Discarded by staff"

    source = models.ForeignKey(PollSource, on_delete=models.CASCADE, related_name="retrieves")
    study_instance_uid = models.CharField(max_length=64)
    study = models.ForeignKey(Study, null=True, blank=True, on_delete=models.SET_NULL)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    origin = models.CharField(max_length=16, default="poll", help_text="poll or backfill")
    study_datetime = models.DateTimeField(null=True, blank=True, help_text="Study Date/Time as the PACS reports it")
    instances_expected = models.PositiveIntegerField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    lease_until = models.DateTimeField(null=True, blank=True)
    completed = models.PositiveIntegerField(default=0, help_text="Sub-operations completed in the last attempt")
    failed = models.PositiveIntegerField(default=0)
    warning = models.PositiveIntegerField(default=0)
    last_status = models.IntegerField(null=True, blank=True, help_text="DIMSE status or HTTP status")
    last_error = models.TextField(blank=True)
    found_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    discarded_by = models.CharField(max_length=150, blank=True)
    discard_reason = models.TextField(blank=True)

    class Meta:
        permissions = [
            ("retry_studyretrieve", "Can retry a failed retrieve"),
            ("discard_studyretrieve", "Can discard a failed retrieve"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["source", "study_instance_uid"], name="studyretrieve_once_per_source")
        ]
        indexes = [
            models.Index(
                fields=["source", "next_attempt_at"],
                name="studyretrieve_due_idx",
                condition=Q(state__in=["pending", "retrieving"]),
            )
        ]

    def __str__(self) -> str:
        return f"Retrieve {self.pk} ({self.state})"

    @property
    def last_status_hex(self) -> str:
        return "" if self.last_status is None else f"0x{self.last_status:04X}"


def token_hash(token: str) -> str:
    # Tokens are 256-bit random strings, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


class StowSender(models.Model):
    """A system allowed to STOW-RS to us, authenticated by its own bearer token (kept hashed)."""

    TOKEN_PREFIX = "plstow_"

    name = models.CharField(
        max_length=16, unique=True, validators=[validate_ae_title], help_text="Recorded as the calling AE title"
    )
    application_entity = models.ForeignKey(
        ApplicationEntity,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        help_text="Optional: the sender's AE, for its quiet period and routing rules",
    )
    token_hash = models.CharField(max_length=64, unique=True)
    token_hint = models.CharField(max_length=16, help_text="First characters of the token, to tell tokens apart")
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def create_with_token(
        cls, *, name: str, application_entity: ApplicationEntity | None = None
    ) -> tuple[StowSender, str]:
        """A new sender and its token. The token is shown once: only its hash is kept."""
        token = cls.TOKEN_PREFIX + secrets.token_urlsafe(32)
        sender = cls(
            name=name,
            application_entity=application_entity,
            token_hash=token_hash(token),
            token_hint=token[: len(cls.TOKEN_PREFIX) + 4],
        )
        sender.full_clean()
        sender.save()
        return sender, token

    @classmethod
    def authenticate(cls, token: str) -> StowSender | None:
        if not token:
            return None
        sender = cls.objects.filter(token_hash=token_hash(token), revoked_at=None).first()
        if sender is not None:
            now = timezone.now()
            if sender.last_used_at is None or now - sender.last_used_at > timedelta(minutes=1):
                cls.objects.filter(pk=sender.pk).update(last_used_at=now)
        return sender

    def revoke(self, *, now: datetime | None = None) -> bool:
        now = now or timezone.now()
        with transaction.atomic():
            if not StowSender.objects.filter(pk=self.pk, revoked_at=None).update(revoked_at=now):
                return False
            # A compare-and-set UPDATE sends no post_save: audit it here (access_audit.py audits the rest).
            before = access_snapshot(self)
            self.revoked_at = now
            access_change_record(
                obj=self, before=before, after=access_snapshot(self), detail="stow sender token revoked"
            )
        return True


class Backfill(models.Model):
    """A historical pull (`manage.py backfill`): a day cursor so an interrupted run resumes."""

    source = models.ForeignKey(PollSource, on_delete=models.CASCADE, related_name="backfills")
    date_from = models.DateField()
    date_to = models.DateField()
    modality = models.CharField(max_length=16, blank=True)
    next_date = models.DateField(help_text="First study date not yet queried")
    queried_through = models.DateField(null=True, blank=True)
    studies_found = models.PositiveIntegerField(default=0)
    studies_retrieved = models.PositiveIntegerField(default=0)
    started_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"Backfill {self.pk} of {self.source_id} {self.date_from}..{self.date_to}"
