"""Raw data for superusers. Results are immutable; the staff UI carries the actions."""

from django.contrib import admin

from results.models import (
    AIModel,
    Delivery,
    DeliveryAttempt,
    Destination,
    InferenceResult,
)


@admin.register(Destination)
class DestinationAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "enabled", "consecutive_failures", "circuit_open_until", "last_success_at"]
    list_filter = ["kind", "enabled"]
    exclude = ["secret"]  # set through the staff UI or import_config, never displayed


@admin.register(InferenceResult)
class InferenceResultAdmin(admin.ModelAdmin):
    list_display = ["id", "study", "model_name", "model_version", "status", "score", "flagged", "created_at"]
    list_filter = ["status", "model_name", "flagged"]

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # audit records


class DeliveryAttemptInline(admin.TabularInline):
    model = DeliveryAttempt
    extra = 0
    can_delete = False
    readonly_fields = ["number", "worker", "started_at", "ended_at", "outcome", "code", "message"]


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = ["id", "destination", "state", "attempts", "next_attempt_at", "last_error_class"]
    list_filter = ["state", "destination", "last_error_class"]
    inlines = [DeliveryAttemptInline]


admin.site.register(AIModel)
