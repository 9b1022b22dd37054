"""Routing app models, one module per seam: core (AE titles, studies, timeline)."""

from routing.models.core import (
    ApplicationEntity,
    Instance,
    Priority,
    Series,
    StoreAssociation,
    Study,
    StudyEvent,
    StudyState,
)

__all__ = [
    "ApplicationEntity",
    "Instance",
    "Priority",
    "Series",
    "StoreAssociation",
    "Study",
    "StudyEvent",
    "StudyState",
]
