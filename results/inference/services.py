"""Inference: claim the most urgent routed study, run its models, store immutable results.

The database decides order: STAT before routine, then the longest-waiting first. A task only
says "there may be work"; whichever worker wakes claims the next study by compare-and-set on
its state, so a lost or duplicated task costs nothing.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from results.deliver.ledger import deliveries_create
from results.deliver.webhooks import webhook_events_record
from results.inference.runtime import (
    InferenceTimeout,
    ModelFileError,
    session_for,
    session_run,
)
from results.inference.volume import (
    ChosenSeries,
    NoSuitableSeries,
    NotApplicable,
    UnreadablePixels,
    series_choose,
    slice_indices,
    volume_load,
    volume_prepare,
    volume_slice_indices,
)
from results.key_region import key_region_find
from results.models import AIModel, FailureReason, InferenceResult, ResultStatus, WebhookEventType
from routing.models import Study, StudyState

logger = logging.getLogger(__name__)


def inference_run_pending(*, budget_seconds: float | None = None) -> int:
    """Claim and infer routed studies, most urgent first, until none is left or the budget is spent.

    The budget keeps one task well inside the queue's timeout; the next task or sweep goes on.
    """
    budget = budget_seconds if budget_seconds is not None else settings.Q_CLUSTER["timeout"] / 3
    started = time.monotonic()
    done = 0
    while time.monotonic() - started < budget:
        study = study_claim_next()
        if study is None:
            break
        study_infer(study=study)
        done += 1
    return done


def study_claim_next() -> Study | None:
    """Move the most urgent ROUTED study to INFERRING and return it; None when there is none."""
    while True:
        with transaction.atomic():
            # SKIP LOCKED (PostgreSQL): workers claiming at the same moment take different studies
            # instead of all queueing on the first one. SQLite ignores it; its writers are serialised.
            candidate = (
                Study.objects.select_for_update(skip_locked=True)
                .filter(state=StudyState.ROUTED)
                .order_by("priority", "state_changed_at", "id")
                .first()
            )
            if candidate is None:
                return None
            if candidate.transition(StudyState.INFERRING, from_states=[StudyState.ROUTED]):
                return candidate
        # Another worker claimed it between our read and our update: try the next one.


def study_infer(*, study: Study) -> list[InferenceResult]:
    """Run every model routing chose for a claimed (INFERRING) study and record the outcome.

    The study ends INFERRED when at least one model produced a score and none failed, FAILED
    when any model failed, IGNORED when no model applied to it. Results are saved together with
    the state change; if the study moved meanwhile (a late instance re-opened it), nothing is
    saved: the re-opened study will be routed and inferred again.
    """
    decision = study.routing_decision()
    models = list(decision.ai_models.filter(enabled=True)) if decision else []
    shadow = set(decision.shadow_ai_models.values_list("pk", flat=True)) if decision else set()
    outcomes = [_model_infer_guarded(study=study, model=model) for model in models]
    for result in outcomes:
        result.shadow = result.model_id in shadow
    live = [r for r in outcomes if not r.shadow]
    # Beside live models, shadow results decide nothing: a failing trial version must not fail
    # the study. A study routed to shadow models only ends as they did.
    deciding = live if live else outcomes
    failed = [r for r in deciding if r.status == ResultStatus.FAILED]
    succeeded = [r for r in deciding if r.status == ResultStatus.SUCCEEDED]
    if failed:
        to_state = StudyState.FAILED
    elif succeeded:
        to_state = StudyState.INFERRED
    else:
        to_state = StudyState.IGNORED
    detail = "; ".join(r.summary() for r in outcomes) or "no enabled model left to run"
    with transaction.atomic():
        if not study.transition(to_state, from_states=[StudyState.INFERRING], detail=detail):
            logger.info("study %s changed state during inference; results discarded", study.pk)
            transaction.set_rollback(True)
            return []
        for result in outcomes:
            result.supersedes = result_current(study=study, model_name=result.model_name, shadow=result.shadow)
            result.save()
        # The transactional outbox: one Delivery row per destination, in this transaction.
        # Shadow results get none: they are recorded and audited, never delivered.
        deliveries_create(
            study=study, results=live, rule_ids=[rule["id"] for rule in decision.matched_rules] if decision else []
        )
        for result in live:
            if result.status == ResultStatus.SUCCEEDED and result.flagged:
                webhook_events_record(event_type=WebhookEventType.RESULT_FLAGGED, study=study, result=result)
    logger.info("study %s %s: %s", study.pk, to_state, detail)
    return outcomes


def result_current(*, study: Study, model_name: str, shadow: bool = False) -> InferenceResult | None:
    """The result of `model_name` for `study` that no later result supersedes. Live and shadow
    results supersede only their own kind, so a version in shadow runs beside the live one."""
    return (
        InferenceResult.objects.current()
        .filter(study=study, model_name=model_name, shadow=shadow)
        .order_by("-created_at", "-id")
        .first()
    )


def model_infer(*, study: Study, model: AIModel) -> InferenceResult:
    """Run one model on one study; every outcome, failures included, is an (unsaved) result."""
    manifest = model.manifest
    result = InferenceResult(
        study=study,
        model=model,
        model_name=model.name,
        model_version=model.version,
        model_sha256=model.sha256,
    )
    # Loading counts the header pass of series_choose too: it reads every slice's header.
    started = time.perf_counter()
    try:
        chosen = series_choose(study=study, manifest=manifest)
    except NotApplicable as exc:
        return _finish(result, status=ResultStatus.NOT_APPLICABLE, message=str(exc))
    except NoSuitableSeries as exc:
        return _fail(result, FailureReason.NO_SUITABLE_SERIES, str(exc) or "no series to choose from")
    result.series = chosen.series
    result.series_instance_uid = chosen.series.series_instance_uid
    result.instance_count = len(chosen.slices)
    headers_read = time.perf_counter() - started
    try:
        session = session_for(model)
    except ModelFileError as exc:
        return _fail(result, FailureReason.MODEL_ERROR, str(exc))

    spec = manifest["input"]
    indices = volume_slice_indices(slices=chosen.slices, manifest=manifest)
    result.evaluated_instances = sorted({chosen.slices[i].instance_id for i in indices})
    try:
        prepared = volume_prepare(slices=chosen.slices, indices=indices, manifest=manifest)
    except UnreadablePixels as exc:
        return _fail(result, FailureReason.UNREADABLE_PIXELS, str(exc))
    result.load_seconds = headers_read + prepared.load_seconds
    result.preprocess_seconds = prepared.preprocess_seconds
    tensor = prepared.tensor
    del prepared
    prepared_at = time.perf_counter()
    try:
        outputs = session_run(session, input_name=spec["name"], tensor=tensor, timeout=settings.INFERENCE_TIMEOUT)
    except InferenceTimeout as exc:
        result.infer_seconds = time.perf_counter() - prepared_at
        return _fail(result, FailureReason.TIMEOUT, str(exc))
    except Exception as exc:  # onnxruntime raises its own types for shape/type/runtime errors
        return _fail(result, FailureReason.MODEL_ERROR, f"{type(exc).__name__}: {str(exc)[:300]}")
    result.infer_seconds = time.perf_counter() - prepared_at
    result = outputs_read(result, outputs=outputs, manifest=manifest)
    if result.flagged:
        region = _key_region(chosen=chosen, indices=indices)
        if region is not None:
            result.key_region = region
    return result


KEY_REGION_SLICES = 64


def _key_region(*, chosen: ChosenSeries, indices: list[int]) -> dict | None:
    """The key slice and region box for the summary image (results/key_region.py), looked for
    only once the model has flagged the study, in at most KEY_REGION_SLICES of the slices it
    read, at full resolution: bounded memory on a 600-slice series, no cost on clean ones."""
    picks = [
        indices[i]
        for i in slice_indices(count=len(indices), depth=min(len(indices), KEY_REGION_SLICES), sampling="nearest")
    ]
    try:
        volume = volume_load(chosen=chosen, indices=picks)
    except UnreadablePixels:  # the model read them a moment ago; a file changed meanwhile
        return None
    return key_region_find(volume=volume, instance_ids=[chosen.slices[i].instance_id for i in picks])


def _model_infer_guarded(*, study: Study, model: AIModel) -> InferenceResult:
    try:
        return model_infer(study=study, model=model)
    except Exception as exc:  # a bug of ours must end as a visible failure, not a study stuck INFERRING
        logger.exception("study %s: inference with %s %s crashed", study.pk, model.name, model.version)
        result = InferenceResult(
            study=study, model=model, model_name=model.name, model_version=model.version, model_sha256=model.sha256
        )
        return _fail(result, FailureReason.MODEL_ERROR, f"internal error: {type(exc).__name__}")


def studies_inferring_stale(*, older_than: timedelta) -> int:
    """Studies stuck in INFERRING (their worker died or was killed by the queue's timeout).

    The first time, the study goes back to ROUTED and is inferred again: a killed worker (OOM,
    a host restart, kill -9) delays work but never loses it. The second time since it was routed
    it fails: a study that killed two workers would likely kill the next one too. Returns how
    many failed.
    """
    cutoff = timezone.now() - older_than
    count = 0
    for study in Study.objects.filter(state=StudyState.INFERRING, state_changed_at__lt=cutoff):
        decision = study.routing_decision()
        models = list(decision.ai_models.all()) if decision else []
        shadow = set(decision.shadow_ai_models.values_list("pk", flat=True)) if decision else set()
        message = f"inference did not finish within {int(older_than.total_seconds())} s (worker stopped or killed)"
        if not _inference_retried(study):
            study.transition(
                StudyState.ROUTED,
                from_states=[StudyState.INFERRING],
                kind=INFERENCE_RETRY,
                detail=f"{message}; inferring again",
            )
            continue
        with transaction.atomic():
            if not study.transition(
                StudyState.FAILED, from_states=[StudyState.INFERRING], detail=f"timeout: {message}"
            ):
                continue
            for model in models:
                result = InferenceResult(
                    study=study,
                    model=model,
                    model_name=model.name,
                    model_version=model.version,
                    model_sha256=model.sha256,
                    shadow=model.pk in shadow,
                )
                _fail(result, FailureReason.TIMEOUT, message)
                result.supersedes = result_current(study=study, model_name=model.name, shadow=result.shadow)
                result.save()
        count += 1
    return count


INFERENCE_RETRY = "inference_retry"


def _inference_retried(study: Study) -> bool:
    """Whether the study already went back for a stuck inference since it was last routed."""
    routed = study.events.filter(kind=StudyState.ROUTED).order_by("-at", "-id").values_list("id", flat=True).first()
    return study.events.filter(kind=INFERENCE_RETRY, id__gt=routed or 0).exists()


def outputs_read(result: InferenceResult, *, outputs: dict, manifest: dict) -> InferenceResult:
    spec = manifest["output"]
    values = outputs.get(spec["score"])
    if values is None or values.size != 1:
        shape = None if values is None else list(values.shape)
        return _fail(result, FailureReason.MODEL_ERROR, f"output {spec['score']!r} is not one number (shape {shape})")
    score = float(values.reshape(-1)[0])
    if not math.isfinite(score):
        return _fail(result, FailureReason.MODEL_ERROR, f"the model returned a non-finite score ({score})")
    result.score = score
    result.flagged = score >= spec["threshold"]
    labels = spec.get("labels") or {}
    result.label = labels.get("positive" if result.flagged else "negative", "")
    result.outputs = {
        name: float(value.reshape(-1)[0]) if value.size == 1 else {"shape": list(value.shape)}
        for name, value in outputs.items()
        if name != spec["score"]
    }
    return _finish(result, status=ResultStatus.SUCCEEDED)


def _fail(result: InferenceResult, reason: str, message: str) -> InferenceResult:
    result.failure_reason = reason
    return _finish(result, status=ResultStatus.FAILED, message=message)


def _finish(result: InferenceResult, *, status: str, message: str = "") -> InferenceResult:
    result.status = status
    result.message = message[:2000]
    result.created_at = timezone.now()
    return result
