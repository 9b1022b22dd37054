"""Staff UI URLs (included at the site root by pacslens/urls.py)."""

from __future__ import annotations

from django.urls import path

from pacslens.staff.views import (
    alerts,
    audit,
    auth,
    coding,
    dashboard,
    destinations,
    endpoints,
    failures,
    models_page,
    retrieves,
    rules,
    studies,
    study_actions,
    triage,
    webhooks,
)

urlpatterns = [
    path("", dashboard.dashboard, name="dashboard"),
    path("login/", auth.login, name="login"),
    path("logout/", auth.logout, name="logout"),
    path("audit/log/", audit.audit_log, name="audit_log"),
    path("studies/", studies.study_list, name="study_list"),
    path("studies/<int:pk>/", studies.study_detail, name="study_detail"),
    path("endpoints/", endpoints.endpoint_list, name="endpoint_list"),
    path("endpoints/ae/new/", endpoints.ae_edit, name="ae_create"),
    path("endpoints/ae/<int:pk>/", endpoints.ae_edit, name="ae_edit"),
    path("endpoints/ae/<int:pk>/toggle/", endpoints.ae_toggle, name="ae_toggle"),
    path("endpoints/ae/<int:pk>/test/", endpoints.ae_test, name="ae_test"),
    path("endpoints/ae/<int:pk>/assess/", endpoints.ae_assess, name="ae_assess"),
    path("endpoints/ae/<int:pk>/delete/", endpoints.ae_delete, name="ae_delete"),
    path("rules/", rules.rule_list, name="rule_list"),
    path("rules/new/", rules.rule_edit, name="rule_create"),
    path("rules/<int:pk>/", rules.rule_edit, name="rule_edit"),
    path("rules/<int:pk>/toggle/", rules.rule_toggle, name="rule_toggle"),
    path("rules/<int:pk>/move/", rules.rule_move, name="rule_move"),
    path("rules/<int:pk>/delete/", rules.rule_delete, name="rule_delete"),
    path("rules/dry-run/", rules.rule_dry_run, name="rule_dry_run"),
]

urlpatterns += [
    path("endpoints/poll-sources/new/", endpoints.poll_source_edit, name="poll_source_create"),
    path("endpoints/poll-sources/<int:pk>/", endpoints.poll_source_edit, name="poll_source_edit"),
    path("endpoints/poll-sources/<int:pk>/toggle/", endpoints.poll_source_toggle, name="poll_source_toggle"),
    path("endpoints/poll-sources/<int:pk>/test/", endpoints.poll_source_test, name="poll_source_test"),
]

urlpatterns += [
    path("failures/", failures.failure_queue, name="failure_queue"),
    path("failures/retry/", failures.failure_retry, name="failure_retry"),
    path("failures/<int:pk>/discard/", failures.failure_discard, name="failure_discard"),
    path("failures/retrieves/", retrieves.failure_retrieves, name="failure_retrieves"),
    path("failures/retrieves/retry/", retrieves.failure_retrieve_retry, name="failure_retrieve_retry"),
    path("failures/retrieves/<int:pk>/discard/", retrieves.failure_retrieve_discard, name="failure_retrieve_discard"),
    path("failures/poll-sources/<int:pk>/poll-now/", retrieves.failure_source_poll_now, name="failure_source_poll_now"),
    path("failures/poll-sources/<int:pk>/stop/", retrieves.failure_source_stop, name="failure_source_stop"),
    path("studies/<int:pk>/rerun/", study_actions.study_rerun_view, name="study_rerun"),
    path("studies/<int:pk>/redeliver/", study_actions.study_redeliver, name="study_redeliver"),
    path("endpoints/destinations/new/", destinations.destination_edit, name="destination_create"),
    path("endpoints/destinations/<int:pk>/", destinations.destination_edit, name="destination_edit"),
    path("endpoints/destinations/<int:pk>/toggle/", destinations.destination_toggle, name="destination_toggle"),
    path("endpoints/destinations/<int:pk>/test/", destinations.destination_test, name="destination_test"),
    path("endpoints/destinations/<int:pk>/delete/", destinations.destination_delete, name="destination_delete"),
    path("models/", models_page.model_list, name="model_list"),
    path("audit/triage/", triage.triage_audit, name="triage_audit"),
    path("audit/triage.csv", triage.triage_audit_csv, name="triage_audit_csv"),
]

urlpatterns += [
    path("alerts/", alerts.alert_page, name="alert_page"),
    path("alerts/channels/new/", alerts.alert_channel_edit, name="alert_channel_create"),
    path("alerts/channels/<int:pk>/", alerts.alert_channel_edit, name="alert_channel_edit"),
    path("alerts/channels/<int:pk>/test/", alerts.alert_channel_test, name="alert_channel_test"),
    path("alerts/rules/new/", alerts.alert_rule_edit, name="alert_rule_create"),
    path("alerts/rules/<int:pk>/", alerts.alert_rule_edit, name="alert_rule_edit"),
    path("endpoints/destinations/<int:pk>/coding/", coding.destination_coding, name="destination_coding"),
    path("webhooks/", webhooks.webhook_page, name="webhook_page"),
    path("webhooks/new/", webhooks.webhook_edit, name="webhook_create"),
    path("webhooks/<int:pk>/", webhooks.webhook_edit, name="webhook_edit"),
]
