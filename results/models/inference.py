"""The model registry and the inference results it produces.

An InferenceResult is an audit record: it is written once and never edited. A re-run writes a
new row that points at the one it supersedes, so the history of every score stays visible.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from django.conf import settings
from django.db import models
from django.utils import timezone


def uid_root_current() -> str:
    """PACSLENS_UID_ROOT as the site has it now: a result keeps the root it was made under."""
    return settings.DICOM_UID_ROOT


class AIModel(models.Model):
    """An ONNX file plus its validated manifest (results/inference/manifest.py describes the fields)."""

    name = models.CharField(max_length=100)
    version = models.CharField(max_length=40)
    # Relative to PACSLENS_DATA_DIR; register_model copies the file under DATA_DIR/models/.
    file = models.CharField(max_length=255)
    sha256 = models.CharField(max_length=64)
    manifest = models.JSONField(help_text="The validated manifest, as registered")
    intended_use = models.TextField(blank=True)
    demonstration = models.BooleanField(
        default=False, help_text="Built by PacsLens for the tour and tests: not for clinical use"
    )
    enabled = models.BooleanField(default=True)
    registered_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name", "version"]
        verbose_name = "AI model"
        constraints = [models.UniqueConstraint(fields=["name", "version"], name="aimodel_name_version_unique")]

    def __str__(self) -> str:
        label = f"{self.name} {self.version}"
        return f"{label} (demonstration, not for clinical use)" if self.demonstration else label

    @property
    def file_path(self) -> Path:
        return Path(settings.DATA_DIR) / self.file

    @property
    def accepts_modalities(self) -> list[str]:
        return list(self.manifest.get("accepts", {}).get("modalities", []))

    @property
    def accepts_body_parts(self) -> list[str]:
        return list(self.manifest.get("accepts", {}).get("body_parts", []))

    @property
    def threshold(self) -> float:
        return float(self.manifest["output"]["threshold"])


class ResultStatus(models.TextChoices):
    SUCCEEDED = "succeeded", "Succeeded"
    NOT_APPLICABLE = "not_applicable", "Not applicable"
    FAILED = "failed", "Failed"


class FailureReason(models.TextChoices):
    NO_SUITABLE_SERIES = "no_suitable_series", "No suitable series"
    UNREADABLE_PIXELS = "unreadable_pixels", "Unreadable pixel data"
    MODEL_ERROR = "model_error", "Model error"
    TIMEOUT = "timeout", "Timeout"


class ImmutableResultError(Exception):
    pass


class InferenceResultQuerySet(models.QuerySet):
    def current(self) -> InferenceResultQuerySet:
        """Results not superseded by a re-run: the ones that count."""
        return self.filter(superseded_by__isnull=True)

    def live(self) -> InferenceResultQuerySet:
        """Results that are delivered: not run in shadow mode."""
        return self.filter(shadow=False)


class InferenceResult(models.Model):
    study = models.ForeignKey("routing.Study", on_delete=models.CASCADE, related_name="inference_results")
    # PROTECT: a model that produced results stays in the registry (disable it instead) for audit.
    model = models.ForeignKey(AIModel, on_delete=models.PROTECT, related_name="results")
    # Snapshots, so the row says exactly what ran even if the registry changes later.
    model_name = models.CharField(max_length=100)
    model_version = models.CharField(max_length=40)
    model_sha256 = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=ResultStatus.choices)
    failure_reason = models.CharField(max_length=32, choices=FailureReason.choices, blank=True)
    message = models.TextField(blank=True, help_text="Readable explanation; never patient data")
    score = models.FloatField(null=True, blank=True)
    flagged = models.BooleanField(null=True, blank=True)
    label = models.CharField(max_length=100, blank=True)
    outputs = models.JSONField(default=dict, blank=True, help_text="Other model outputs, by name")
    series = models.ForeignKey("routing.Series", null=True, blank=True, on_delete=models.SET_NULL)
    series_instance_uid = models.CharField(max_length=64, blank=True)
    instance_count = models.PositiveIntegerField(default=0)
    # Internal Instance ids of the slices the model actually read (it samples a series): the SR
    # cites these as the evaluated images. Empty for results made before this field existed.
    evaluated_instances = models.JSONField(default=list, blank=True)
    # Where the finding is, for the summary image and the key object selection: {"instance": id,
    # "bbox": [row0, col0, row1, col1] (inclusive, in that instance's pixels), "pixels": n}.
    # Found by our code in the volume the model read (results/inference/key_region.py), whatever
    # the model's outputs; empty when the result is not flagged or no dense region was found.
    key_region = models.JSONField(default=dict, blank=True)
    # Shadow mode: inferred, recorded and audited, never delivered (the rule ran the model in shadow).
    shadow = models.BooleanField(default=False)
    load_seconds = models.FloatField(null=True, blank=True)
    preprocess_seconds = models.FloatField(null=True, blank=True)
    infer_seconds = models.FloatField(null=True, blank=True)
    supersedes = models.OneToOneField(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="superseded_by"
    )
    created_at = models.DateTimeField(default=timezone.now)
    # Identifiers of the outgoing SR/HL7/FHIR objects derive from this random UUID and the
    # installation's (results/deliver/identity.py); the other two fields pin how they were derived.
    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    uid_root = models.CharField(
        max_length=32,
        blank=True,
        editable=False,
        default=uid_root_current,
        help_text="DICOM org root in force when made; blank: 2.25",
    )
    legacy_uid_seed = models.CharField(
        max_length=64,
        blank=True,
        default="",
        editable=False,
        help_text="Results delivered before identities existed keep deriving their first identifiers",
    )

    objects = InferenceResultQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["study", "model_name", "created_at"]),
            # The alert rules' windows (model failure rate, flagged share) read the last hours only.
            models.Index(fields=["created_at"], name="result_created_idx"),
        ]

    def __str__(self) -> str:
        return f"Result {self.pk} for study {self.study_id}: {self.status}"

    def save(self, *args, **kwargs) -> None:
        # Results are audit records: once written they are never edited (supersede instead).
        if not self._state.adding:
            raise ImmutableResultError("an InferenceResult is never edited; run again to supersede it")
        super().save(*args, **kwargs)

    @property
    def is_current(self) -> bool:
        return not InferenceResult.objects.filter(supersedes=self).exists()

    def summary(self) -> str:
        shadow = " (shadow)" if self.shadow else ""
        if self.status == ResultStatus.SUCCEEDED:
            flag = "FLAGGED" if self.flagged else "not flagged"
            return f"{self.model_name} {self.model_version}{shadow}: score {self.score:.3f}, {flag}"
        if self.status == ResultStatus.NOT_APPLICABLE:
            return f"{self.model_name} {self.model_version}: not applicable ({self.message})"
        return f"{self.model_name} {self.model_version}: failed, {self.failure_reason} ({self.message})"
