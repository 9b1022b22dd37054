"""Result destinations and the delivery ledger (the transactional outbox of DESIGN.md).

A Delivery row is created in the same transaction as its InferenceResult; the queue only wakes
workers. Workers claim rows with a compare-and-set UPDATE and a lease, so a killed worker
delays a delivery (until the lease expires) but never loses or double-applies it, and every
re-send reuses the row's idempotency key.
"""

from __future__ import annotations

from datetime import timedelta

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, URLValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from routing.models.fields import NameField, PortField
from routing.models.oauth import HttpClientAuth
from routing.models.sealed import SealedSecretField, UnreadableSecret
from routing.validators import validate_host

# Where an HL7 destination's RIS keeps the accession number; results/deliver/hl7.py maps each to
# its segment and field (tests/test_hl7.py keeps the two lists equal). Kept here so the models
# never import the delivery code that imports them.
ACCESSION_FIELDS = ("OBR-18", "OBR-2", "OBR-3", "ORC-2", "ORC-3")


class DestinationKind(models.TextChoices):
    DICOM = "dicom", "DICOM C-STORE (SR)"
    DICOMWEB = "dicomweb", "DICOMweb STOW-RS (SR)"
    HL7 = "hl7", "HL7 v2 over MLLP"
    FHIR = "fhir", "FHIR R4"


class AuthKind(models.TextChoices):
    NONE = "none", "None"
    BASIC = "basic", "Basic"
    BEARER = "bearer", "Bearer token"
    OAUTH2 = "oauth2", "OAuth 2.0 client credentials"


class AckAction(models.TextChoices):
    RETRY = "retry", "Retry (transient)"
    FAIL = "fail", "Fail (permanent)"


# Requests one send makes, each with the destination's timeout: FHIR writes the Observation,
# searches and updates the ImagingStudy; DICOM opens an association, then stores.
REQUESTS_PER_SEND = {"fhir": 3, "dicom": 2, "dicomweb": 1, "hl7": 1}


class Destination(HttpClientAuth):
    """Where results go. One row per PACS, DICOMweb server, HL7 receiver or FHIR server."""

    name = NameField(max_length=50, unique=True, help_text="Short name used in the UI, CLI and YAML")
    kind = models.CharField(max_length=10, choices=DestinationKind.choices)
    enabled = models.BooleanField(default=True)
    description = models.CharField(max_length=200, blank=True)
    # Routing rules choose destinations; a rule without destinations delivers nowhere.
    rules = models.ManyToManyField("routing.RoutingRule", blank=True, related_name="destinations")

    # DICOM: the PACS's AE (host, port, TLS live there).
    application_entity = models.ForeignKey(
        "routing.ApplicationEntity", null=True, blank=True, on_delete=models.PROTECT, related_name="destinations"
    )
    # DICOM / DICOMweb: what goes beside the SR, in the same delivery (one ledger row, one retry
    # schedule); results/deliver/summary.py builds them.
    send_summary_image = models.BooleanField(
        default=False,
        help_text="Also send a Secondary Capture of the key slice with the finding outlined, for viewers without SR",
    )
    send_key_objects = models.BooleanField(
        default=False, help_text="Also send a Key Object Selection flagging the key images, for viewers that show KOS"
    )
    # DICOMweb / FHIR (and the OAuth client and CA bundle fields of HttpClientAuth)
    base_url = models.CharField(max_length=300, blank=True, help_text="e.g. https://pacs.example/dicom-web")
    auth = models.CharField(max_length=10, choices=AuthKind.choices, default=AuthKind.NONE)
    username = models.CharField(max_length=100, blank=True)
    # Password or bearer token, encrypted at rest (routing/models/sealed.py). Never exported to
    # YAML; write-only in the UI; dropped whenever the target or auth changes (TARGET_FIELDS).
    secret = SealedSecretField(blank=True)
    # HL7 v2 over MLLP
    host = models.CharField(max_length=255, blank=True, validators=[validate_host])
    port = PortField(null=True, blank=True)
    hl7_message_type = models.CharField(
        max_length=7, blank=True, choices=[("ORU^R01", "ORU^R01 result"), ("ORM^O01", "ORM^O01 priority change")]
    )
    hl7_version = models.CharField(
        max_length=5, blank=True, default="2.5.1", choices=[(v, v) for v in ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")]
    )
    sending_application = models.CharField(max_length=50, blank=True, default="PACSLENS")
    sending_facility = models.CharField(max_length=50, blank=True)
    receiving_application = models.CharField(max_length=50, blank=True)
    receiving_facility = models.CharField(max_length=50, blank=True)
    accession_field = models.CharField(
        max_length=6, blank=True, default="OBR-18", help_text="Where the RIS keeps the accession number"
    )
    on_ack_error = models.CharField(
        max_length=5, choices=AckAction.choices, default=AckAction.FAIL, help_text="What an AE/CE acknowledgement means"
    )
    on_ack_reject = models.CharField(
        max_length=5,
        choices=AckAction.choices,
        default=AckAction.RETRY,
        help_text="What an AR/CR acknowledgement means",
    )
    # Retry policy
    timeout_seconds = models.FloatField(default=10.0, validators=[MinValueValidator(0.5)])
    max_attempts = models.PositiveIntegerField(default=8, validators=[MinValueValidator(1), MaxValueValidator(100)])
    backoff_base_seconds = models.FloatField(default=10.0, validators=[MinValueValidator(0.1)])
    backoff_cap_seconds = models.FloatField(default=1800.0, validators=[MinValueValidator(1)])
    # Circuit breaker: after this many consecutive failures, pause the destination.
    breaker_threshold = models.PositiveIntegerField(default=5, validators=[MinValueValidator(1)])
    breaker_cooldown_seconds = models.FloatField(default=60.0, validators=[MinValueValidator(1)])
    # Health (written by workers)
    consecutive_failures = models.PositiveIntegerField(default=0)
    circuit_open_until = models.DateTimeField(null=True, blank=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    last_failure_at = models.DateTimeField(null=True, blank=True)
    # The last Test button press (staff), kept so Health can say "Test failed 2 min ago: why".
    last_test_at = models.DateTimeField(null=True, blank=True)
    last_test_ok = models.BooleanField(null=True, blank=True)
    last_test_detail = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    # Where the secrets go and how: change any of these and the stored secrets must be given again,
    # or Test and the next delivery would hand them to the new target.
    TARGET_FIELDS = (
        "kind",
        "application_entity",
        "base_url",
        "host",
        "port",
        "auth",
        "username",
        *HttpClientAuth.TARGET_FIELDS,
    )

    def __str__(self) -> str:
        return f"{self.name} ({self.get_kind_display()})"

    @property
    def secret_unreadable(self) -> bool:
        """A stored secret the configured keys cannot decrypt: a configuration error, never sent."""
        return isinstance(self.secret, UnreadableSecret)

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if self.kind == DestinationKind.DICOM:
            if not self.application_entity_id:
                errors["application_entity"] = "A DICOM destination needs the PACS's AE title."
            elif self.application_entity is None or self.application_entity.missing_address:
                missing = self.application_entity.missing_address if self.application_entity else "host and port"
                errors["application_entity"] = f"That AE title has no {missing} to send to: add it under AE titles."
        if self.kind in (DestinationKind.DICOMWEB, DestinationKind.FHIR):
            try:
                URLValidator(schemes=["http", "https"])(self.base_url)
            except ValidationError:
                errors["base_url"] = "Enter the server's base URL, starting with http:// or https://."
            if self.auth == AuthKind.BASIC and not self.username:
                errors["username"] = "Basic authentication needs a user name."
            errors.update(self.oauth_problems(required=self.auth == AuthKind.OAUTH2))
        if self.kind == DestinationKind.HL7:
            if not self.host:
                errors["host"] = "An HL7 destination needs the RIS host."
            if self.port is None:  # 0 is out of range, which the field's validators say
                errors["port"] = "An HL7 destination needs the RIS MLLP port."
            if not self.hl7_message_type:
                errors["hl7_message_type"] = "Choose ORU^R01 or ORM^O01."
            if self.accession_field not in ACCESSION_FIELDS:
                errors["accession_field"] = f"Use one of {', '.join(ACCESSION_FIELDS)}."
        if self.kind not in (DestinationKind.DICOM, DestinationKind.DICOMWEB):
            for option in ("send_summary_image", "send_key_objects"):
                if getattr(self, option):
                    errors[option] = "Only DICOM and DICOMweb destinations send images and key objects."
        if self.backoff_cap_seconds < self.backoff_base_seconds:
            errors["backoff_cap_seconds"] = "The cap must be at least the base delay."
        if errors:
            raise ValidationError(errors)

    def delete_blockers(self) -> list[str]:
        """Why this destination cannot be deleted: rules sending to it, deliveries it holds (the
        ledger is history: disable the destination instead)."""
        blockers = []
        rules = sorted(self.rules.values_list("name", flat=True))
        if rules:
            blockers.append(f"routing rule(s) {', '.join(rules)} send to it")
        deliveries = self.deliveries.count()
        if deliveries:
            blockers.append(f"it holds {deliveries} deliver{'y' if deliveries == 1 else 'ies'} (disable it instead)")
        return blockers

    def send_seconds_max(self) -> float:
        """How long one honest send may take: every request it makes, each allowed its timeout
        twice (to connect, then for the answer). A delivery lease must outlive this."""
        return REQUESTS_PER_SEND.get(self.kind, 1) * 2 * self.timeout_seconds

    @property
    def circuit_open(self) -> bool:
        return bool(self.circuit_open_until and self.circuit_open_until > timezone.now())

    @property
    def circuit_open_until_text(self) -> str:
        """When the open breaker lets deliveries through again, in local time ("" when closed)."""
        return f"{timezone.localtime(self.circuit_open_until):%H:%M:%S}" if self.circuit_open else ""

    @property
    def last_test_failed(self) -> bool:
        """The last Test failed and no delivery succeeded since."""
        if self.last_test_ok is not False or self.last_test_at is None:
            return False
        return self.last_success_at is None or self.last_test_at > self.last_success_at

    def test_record(self, *, ok: bool, detail: str) -> None:
        """Keep the outcome of a Test (the Test button) for the dashboard's Health panel."""
        self.last_test_at, self.last_test_ok, self.last_test_detail = timezone.now(), ok, detail[:500]
        Destination.objects.filter(pk=self.pk).update(
            last_test_at=self.last_test_at, last_test_ok=ok, last_test_detail=self.last_test_detail
        )

    def backoff(self, attempts: int, jitter: float) -> timedelta:
        """Delay before attempt `attempts + 1`: exponential, capped, with `jitter` in [0, 1)."""
        delay = min(self.backoff_cap_seconds, self.backoff_base_seconds * (2 ** max(attempts - 1, 0)))
        return timedelta(seconds=delay * (0.5 + jitter / 2))


class DeliveryState(models.TextChoices):
    PENDING = "pending", "Pending"
    IN_FLIGHT = "in_flight", "In flight"
    DELIVERED = "delivered", "Delivered"
    FAILED = "failed", "Failed"
    DISCARDED = "discarded", "Discarded"


class ErrorClass(models.TextChoices):
    TRANSIENT = "transient", "Transient"
    PERMANENT = "permanent", "Permanent"
    CONFIG_ERROR = "config_error", "Configuration error"
    # The OAuth token endpoint was unreachable or refused our client (routing/oauth.py).
    TOKEN_ERROR = "token_error", "Token error (OAuth)"


class Delivery(models.Model):
    result = models.ForeignKey("results.InferenceResult", on_delete=models.PROTECT, related_name="deliveries")
    destination = models.ForeignKey(Destination, on_delete=models.PROTECT, related_name="deliveries")
    study = models.ForeignKey("routing.Study", on_delete=models.CASCADE, related_name="deliveries")
    kind = models.CharField(max_length=10, choices=DestinationKind.choices)
    # SR SOP Instance UID / HL7 MSH-10 / FHIR identifier value: the same on every re-send.
    idempotency_key = models.CharField(max_length=80)
    # FHIR only: the system of the Observation identifier whose value is idempotency_key.
    identifier_system = models.CharField(max_length=255, blank=True, default="")
    # The destination's coding profile when this row was written (CodingProfile.snapshot), so
    # every re-send carries the same identifiers and codes; {} (rows from before profiles): the defaults.
    coding = models.JSONField(default=dict, blank=True)
    state = models.CharField(max_length=10, choices=DeliveryState.choices, default=DeliveryState.PENDING)
    priority = models.SmallIntegerField(default=5, help_text="Copied from the study: lower goes first")
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    lease_until = models.DateTimeField(null=True, blank=True)
    lease_owner = models.CharField(max_length=100, blank=True)
    last_error = models.TextField(blank=True)
    last_error_class = models.CharField(max_length=12, choices=ErrorClass.choices, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    discarded_by = models.CharField(max_length=150, blank=True)
    discard_reason = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "deliveries"
        constraints = [
            models.UniqueConstraint(fields=["result", "destination"], name="delivery_result_destination_unique"),
        ]
        indexes = [
            # Keeps the claim query cheap however long the delivered history grows.
            models.Index(
                fields=["priority", "next_attempt_at"],
                name="delivery_due_idx",
                condition=Q(state__in=["pending", "in_flight"]),
            ),
            models.Index(fields=["state", "destination"]),
        ]

    def __str__(self) -> str:
        return f"Delivery {self.pk} of result {self.result_id} to {self.destination_id}: {self.state}"

    @property
    def next_try_at(self):
        """When a pending delivery is tried next: its own time, or later while its destination's
        circuit breaker is open (the claim skips those rows). None unless pending."""
        if self.state != DeliveryState.PENDING:
            return None
        held = self.destination.circuit_open_until if self.destination.circuit_open else None
        return max(self.next_attempt_at, held) if held else self.next_attempt_at

    @property
    def held_by_breaker(self) -> bool:
        return self.state == DeliveryState.PENDING and self.next_try_at != self.next_attempt_at


class DeliveryAttempt(models.Model):
    """Append-only: one row per try, whatever came of it."""

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="attempt_log")
    number = models.PositiveIntegerField()
    worker = models.CharField(max_length=100, blank=True)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField()
    outcome = models.CharField(max_length=12, help_text="success, transient, permanent, config_error or token_error")
    code = models.CharField(max_length=40, blank=True, help_text="DICOM status, HL7 ACK code or HTTP status")
    message = models.TextField(blank=True)

    class Meta:
        ordering = ["started_at", "id"]

    def __str__(self) -> str:
        return f"Attempt {self.number} of delivery {self.delivery_id}: {self.outcome}"
