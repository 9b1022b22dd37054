"""AE titles, studies and their timeline.

A Study's state only changes through `Study.transition`, a compare-and-set UPDATE that also
writes the StudyEvent, so two workers can never both move a study and the timeline is complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from django.conf import settings
from django.core import checks
from django.core.exceptions import ValidationError
from django.db import DatabaseError, models, transaction
from django.db.models import Q
from django.utils import timezone

from routing.models.fields import PortField
from routing.validators import validate_ae_title, validate_host

if TYPE_CHECKING:
    from routing.models.rules import RoutingDecision


@checks.register(checks.Tags.security)
def outbound_tls_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """The listener and workers refuse to start while an AE we reach over DICOM TLS has no CA
    file to be checked against (routing/receive/dicom_tls.py trusts no system CA)."""
    if settings.DICOM_TLS_CA:
        return []
    try:
        names = list(ApplicationEntity.objects.filter(tls=True, enabled=True).values_list("ae_title", flat=True)[:5])
    except DatabaseError:  # no database or tables yet (before migrate): nothing configured
        return []
    if not names:
        return []
    return [
        checks.Error(
            f"outbound DICOM TLS to {', '.join(names)} needs PACSLENS_DICOM_TLS_CA, which is not set",
            hint="Set PACSLENS_DICOM_TLS_CA to the CA file that signed the peers' certificates; "
            "the system's CAs are not trusted for DICOM peers (docs/tls.md).",
            id="pacslens.E201",
        )
    ]


class ApplicationEntity(models.Model):
    """A remote DICOM node: a PACS, a modality, a router."""

    # What staff set, in the form and in the site YAML alike (one list, so neither misses a field).
    CONFIG_FIELDS = [
        "ae_title",
        "host",
        "port",
        "description",
        "enabled",
        "may_send",
        "check_peer_ip",
        "receives_results",
        "may_query",
        "tls",
        "tls_certificate_name",
        "quiet_period_seconds",
    ]

    ae_title = models.CharField(max_length=16, unique=True, validators=[validate_ae_title])
    host = models.CharField(max_length=255, blank=True, validators=[validate_host], help_text="Host name or IP address")
    port = PortField(null=True, blank=True)
    description = models.CharField(max_length=200, blank=True)
    enabled = models.BooleanField(default=True)
    may_send = models.BooleanField(
        default=True, help_text="On the calling-AE allow-list: may open associations to store to us"
    )
    # On by default: an AE title is a plain string any machine can claim; the host address is not.
    check_peer_ip = models.BooleanField(
        default=True, help_text="Also require the association to come from the host's address"
    )
    tls_certificate_name = models.CharField(
        max_length=255,
        blank=True,
        help_text="When set, associations with this calling AE title must come over DICOM TLS with a client "
        "certificate carrying this name (its subject CN or a DNS name in its subjectAltName)",
    )
    receives_results = models.BooleanField(default=False, help_text="Results (SR) are stored to it")
    may_query = models.BooleanField(default=False, help_text="We may query/retrieve from it")
    tls = models.BooleanField(default=False, help_text="Use DICOM TLS when we connect to it")
    quiet_period_seconds = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="A study from this sender is complete after this many seconds without a new instance "
        "(empty: the site default)",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["ae_title"]
        verbose_name = "application entity"

    def __str__(self) -> str:
        return self.ae_title

    def save(self, *args, **kwargs) -> None:
        self.ae_title = self.ae_title.strip()
        self.tls_certificate_name = self.tls_certificate_name.strip()
        super().save(*args, **kwargs)

    def clean(self) -> None:
        if self.may_send and not self.host.strip():
            raise ValidationError(
                {"host": "A node that may send to us needs its host: the listener checks associations come from it."}
            )

    @property
    def missing_address(self) -> str:
        """What PacsLens lacks to connect to this node ("host", "port", "host and port"), or ""."""
        return " and ".join(part for part in ("host", "port") if not getattr(self, part))

    def delete_blockers(self) -> list[str]:
        """Why this node cannot be deleted: what still points at it (empty: nothing does)."""
        blockers = []
        # Reverse relations by name: results' Destination refers to us, we never import it.
        destinations = sorted(self.destinations.values_list("name", flat=True))
        if destinations:
            blockers.append(f"result destination(s) {', '.join(destinations)} send to it")
        sources = sorted(self.pollsource_set.values_list("name", flat=True))
        if sources:
            blockers.append(f"poll source(s) {', '.join(sources)} query it")
        return blockers

    def certificate_accepted(self, names: set[str]) -> bool:
        """Whether a client certificate with these names (CN and DNS subjectAltNames) may speak for this AE."""
        if not self.tls_certificate_name:
            return True
        return self.tls_certificate_name.lower() in {name.lower() for name in names}


class StudyState(models.TextChoices):
    RECEIVING = "receiving", "Receiving"
    COMPLETE = "complete", "Complete"
    ROUTED = "routed", "Routed"
    IGNORED = "ignored", "Ignored"
    INFERRING = "inferring", "Inferring"
    INFERRED = "inferred", "Inferred"
    DELIVERING = "delivering", "Delivering"
    DELIVERED = "delivered", "Delivered"
    FAILED = "failed", "Failed"
    # Settled without every delivery succeeding: staff discarded at least one (and none failed).
    # Not `delivered` (README's rule: delivered means every delivery succeeded) and not `failed`
    # (nothing is left for staff to do; its files follow the retention rule of settled studies).
    CLOSED = "closed", "Closed (discarded)"


class Priority(models.IntegerChoices):
    """Lower sorts first: the database orders the work queue by it."""

    STAT = 0, "STAT"
    ROUTINE = 5, "Routine"


class StudyManager(models.Manager["Study"]):
    def by_uid_or_pk(self, value: str) -> Study | None:
        """The study with this Study Instance UID, else with this internal id (what commands accept)."""
        study = self.filter(study_instance_uid=value).first()
        if study is None and value.isdigit():
            study = self.filter(pk=int(value)).first()
        return study

    def by_reference(self, value: str) -> list[Study]:
        """The studies staff mean by `value`: a Study Instance UID, an accession number (several
        studies may share one) or an internal id, in that order; newest first."""
        value = value.strip()
        for lookup in ({"study_instance_uid": value}, {"accession_number": value}):
            studies = list(self.filter(**lookup).order_by("-first_received_at", "-id")) if value else []
            if studies:
                return studies
        return list(self.filter(pk=int(value))) if value.isdigit() else []


class Study(models.Model):
    study_instance_uid = models.CharField(max_length=64, unique=True)
    state = models.CharField(max_length=16, choices=StudyState.choices, default=StudyState.RECEIVING)
    priority = models.SmallIntegerField(choices=Priority.choices, default=Priority.ROUTINE)
    # Patient data: shown to logged-in staff only, never logged or passed to tasks.
    patient_id = models.CharField(max_length=64, blank=True)
    patient_name = models.CharField(max_length=324, blank=True)
    accession_number = models.CharField(max_length=16, blank=True, db_index=True)
    study_date = models.CharField(max_length=8, blank=True)
    study_description = models.CharField(max_length=64, blank=True)
    modalities = models.CharField(max_length=64, blank=True, help_text="Backslash-separated, as in DICOM")
    calling_ae_title = models.CharField(max_length=16, blank=True)
    called_ae_title = models.CharField(max_length=16, blank=True)
    sender = models.ForeignKey(ApplicationEntity, null=True, blank=True, on_delete=models.SET_NULL)
    first_received_at = models.DateTimeField(default=timezone.now)
    last_received_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)
    state_changed_at = models.DateTimeField(default=timezone.now)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = StudyManager()

    class Meta:
        verbose_name_plural = "studies"
        indexes = [
            models.Index(fields=["state", "priority", "state_changed_at"]),
            models.Index(fields=["last_received_at"], name="study_receiving_idx", condition=Q(state="receiving")),
            # The studies page's and the API's order (newest first, id breaks ties): pages and
            # cursors read it off the index instead of sorting every study (bench/api.py).
            models.Index(fields=["-first_received_at", "-id"], name="study_received_order_idx"),
        ]

    def __str__(self) -> str:
        return f"Study {self.pk} ({self.study_instance_uid})"

    def transition(
        self,
        to_state: str,
        *,
        from_states: Sequence[str] | None = None,
        detail: str = "",
        kind: str = "",
        where: Q | None = None,
    ) -> bool:
        """Move to `to_state` if the study is still in one of `from_states` (default: its current state).

        Returns False when another process moved it first (or `where` no longer holds). The event
        is written in the same transaction, so the timeline and the state never disagree.
        """
        from_states = from_states or [self.state]
        now = timezone.now()
        fields: dict = {"state": to_state, "state_changed_at": now}
        if to_state == StudyState.COMPLETE:
            fields["completed_at"] = now
        with transaction.atomic():
            rows = Study.objects.filter(pk=self.pk, state__in=from_states)
            if where is not None:
                rows = rows.filter(where)
            updated = rows.update(**fields)
            if updated != 1:
                return False
            StudyEvent.objects.create(
                study=self,
                at=now,
                kind=kind or to_state,
                from_state=self.state if self.state in from_states else from_states[0],
                to_state=to_state,
                detail=detail[:1000],
            )
        for name, value in fields.items():
            setattr(self, name, value)
        return True

    def routing_decision(self) -> RoutingDecision | None:
        """The latest RoutingDecision (a re-run routes again and adds one), or None."""
        return self.routing_decisions.order_by("-decided_at", "-id").first()

    def log_event(self, kind: str, detail: str = "") -> StudyEvent:
        return StudyEvent.objects.create(study=self, kind=kind, detail=detail[:1000])

    def quiet_period(self, default_seconds: int) -> timedelta:
        seconds = self.sender.quiet_period_seconds if self.sender and self.sender.quiet_period_seconds else None
        return timedelta(seconds=seconds or default_seconds)


class Series(models.Model):
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="series")
    series_instance_uid = models.CharField(max_length=64, unique=True)
    modality = models.CharField(max_length=16, blank=True)
    body_part_examined = models.CharField(max_length=16, blank=True)
    series_description = models.CharField(max_length=64, blank=True)
    series_number = models.IntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "series"

    def __str__(self) -> str:
        return f"Series {self.pk} ({self.series_instance_uid})"


class StoreAssociation(models.Model):
    """One inbound association (C-STORE push or a retrieve into our listener).

    Study completeness looks at these: a study whose delivering associations were all
    released normally can complete after a short grace period instead of the quiet period.
    """

    calling_ae_title = models.CharField(max_length=16)
    called_ae_title = models.CharField(max_length=16)
    peer_address = models.CharField(max_length=64, blank=True)
    listener = models.CharField(max_length=100, blank=True, help_text="host:pid of the listener process")
    started_at = models.DateTimeField(default=timezone.now)
    ended_at = models.DateTimeField(null=True, blank=True)
    released_normally = models.BooleanField(default=False)
    instances_received = models.PositiveIntegerField(default=0)
    # When a worker was asked to check its studies for completion, the release grace after it
    # ended (pacslens/ops/due_wake.py); null while that is still to come.
    completion_checked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["completion_checked_at", "ended_at"], name="assoc_completion_due")]

    def __str__(self) -> str:
        return f"Association {self.pk} from {self.calling_ae_title}"


class Instance(models.Model):
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="instances")
    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="instances")
    association = models.ForeignKey(StoreAssociation, null=True, blank=True, on_delete=models.SET_NULL)
    sop_instance_uid = models.CharField(max_length=64, unique=True)
    sop_class_uid = models.CharField(max_length=64)
    transfer_syntax_uid = models.CharField(max_length=64)
    instance_number = models.IntegerField(null=True, blank=True)
    # Relative to PACSLENS_DATA_DIR and chosen by us, never from a peer-supplied string.
    path = models.CharField(max_length=255, blank=True)
    size = models.BigIntegerField()
    calling_ae_title = models.CharField(max_length=16, blank=True)
    received_at = models.DateTimeField(default=timezone.now)
    deleted_at = models.DateTimeField(null=True, blank=True, help_text="Pixel data removed by retention")

    def __str__(self) -> str:
        return f"Instance {self.pk} ({self.sop_instance_uid})"


class StudyEvent(models.Model):
    """The study timeline: one row per state change or notable step. Never patient data in detail."""

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(default=timezone.now)
    kind = models.CharField(max_length=32)
    from_state = models.CharField(max_length=16, blank=True)
    to_state = models.CharField(max_length=16, blank=True)
    detail = models.TextField(blank=True)

    class Meta:
        ordering = ["at", "id"]
        indexes = [models.Index(fields=["study", "at"])]

    def __str__(self) -> str:
        return f"{self.kind} at {self.at:%Y-%m-%d %H:%M:%S}"
