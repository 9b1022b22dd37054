"""Raw data for superusers. Day-to-day configuration happens in the staff UI or the YAML."""

from django.contrib import admin

from routing.models import ApplicationEntity, AuditEntry, Instance, Series, StoreAssociation, Study, StudyEvent


@admin.register(ApplicationEntity)
class ApplicationEntityAdmin(admin.ModelAdmin):
    list_display = ["ae_title", "host", "port", "enabled", "may_send", "receives_results", "may_query", "tls"]
    list_filter = ["enabled", "may_send", "receives_results", "may_query"]
    search_fields = ["ae_title", "host", "description"]


class StudyEventInline(admin.TabularInline):
    model = StudyEvent
    extra = 0
    readonly_fields = ["at", "kind", "from_state", "to_state", "detail"]


@admin.register(Study)
class StudyAdmin(admin.ModelAdmin):
    list_display = [
        "study_instance_uid",
        "state",
        "priority",
        "accession_number",
        "calling_ae_title",
        "last_received_at",
    ]
    list_filter = ["state", "priority", "calling_ae_title"]
    search_fields = ["study_instance_uid", "accession_number"]
    inlines = [StudyEventInline]
    readonly_fields = ["state", "state_changed_at", "completed_at"]


admin.site.register(Series)
admin.site.register(Instance)
admin.site.register(StoreAssociation)


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    """Read-only: the audit log is evidence."""

    list_display = ["at", "actor", "action", "object_type", "object_id"]
    list_filter = ["action"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
