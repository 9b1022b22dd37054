"""Results app models, one module per seam: inference (model registry, results)."""

from results.models.inference import (
    AIModel,
    FailureReason,
    ImmutableResultError,
    InferenceResult,
    ResultStatus,
)

__all__ = [
    "AIModel",
    "FailureReason",
    "ImmutableResultError",
    "InferenceResult",
    "ResultStatus",
]
