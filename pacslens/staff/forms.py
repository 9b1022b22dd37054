"""Forms of the staff pages: study filters, AE titles, routing rules and their conditions,
destinations, the failure queue's discard, the triage-audit filters.

Validation lives on the models (`clean()`, validators); the forms show it inline, field by field.
"""

from __future__ import annotations

from typing import cast

from django import forms
from django.db.models import Exists, OuterRef, Q, QuerySet

from results.models import AIModel, AuthKind, Destination, DestinationKind, InferenceResult
from results.models.delivery import ACCESSION_FIELDS
from routing.models import (
    ApplicationEntity,
    HttpClientAuth,
    PollSource,
    RoutingRule,
    RuleCondition,
    Study,
    StudyState,
)
from routing.models.sealed import UnreadableSecret
from routing.validators import ae_title_warning

STUDY_SORTS = {
    "received": "first_received_at",
    "-received": "-first_received_at",
    "changed": "state_changed_at",
    "-changed": "-state_changed_at",
    "state": "state",
    "-state": "-state",
    "accession": "accession_number",
    "-accession": "-accession_number",
    "priority": "priority",
    "-priority": "-priority",
}


class StudyFilterForm(forms.Form):
    q = forms.CharField(required=False, label="Accession or Study UID")
    state = forms.ChoiceField(required=False, choices=[("", "any")] + StudyState.choices)
    received_from = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    received_to = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    calling_ae = forms.CharField(required=False, label="Sending AE")
    modality = forms.CharField(required=False)
    flag = forms.ChoiceField(
        required=False, choices=[("", "any"), ("yes", "flagged"), ("no", "not flagged")], label="Finding"
    )
    sort = forms.ChoiceField(required=False, choices=[(k, k) for k in STUDY_SORTS], widget=forms.HiddenInput)

    def filter(self, studies: QuerySet[Study]) -> QuerySet[Study]:
        data = self.cleaned_data if self.is_valid() else {}
        if q := (data.get("q") or "").strip():
            # A prefix of the accession number finds it (RIS numbers share a site or year prefix).
            studies = studies.filter(Q(accession_number__istartswith=q) | Q(study_instance_uid=q))
        if state := data.get("state"):
            studies = studies.filter(state=state)
        if day := data.get("received_from"):
            studies = studies.filter(first_received_at__date__gte=day)
        if day := data.get("received_to"):
            studies = studies.filter(first_received_at__date__lte=day)
        if ae := (data.get("calling_ae") or "").strip():
            studies = studies.filter(calling_ae_title__iexact=ae)
        if modality := (data.get("modality") or "").strip().upper():
            studies = studies.filter(
                Q(modalities=modality)
                | Q(modalities__startswith=modality + "\\")
                | Q(modalities__endswith="\\" + modality)
                | Q(modalities__contains="\\" + modality + "\\")
            )
        flag = data.get("flag")
        if flag:
            flagged = InferenceResult.objects.current().live().filter(study=OuterRef("pk"), flagged=True)
            studies = studies.filter(Exists(flagged)) if flag == "yes" else studies.exclude(Exists(flagged))
        return studies.order_by(STUDY_SORTS.get(data.get("sort") or "", "-first_received_at"), "-id")


class ConfigModelForm(forms.ModelForm):
    """A configuration form: one message per problem. A value the form field refuses never
    reaches the model, whose clean() would then add "needs a port" on top of "a port is between..."."""

    def _update_errors(self, errors) -> None:
        if hasattr(errors, "error_dict"):
            errors.error_dict = {f: m for f, m in errors.error_dict.items() if f not in self.errors}
            if not errors.error_dict:
                return
        super()._update_errors(errors)  # type: ignore[misc]  # ModelForm API the stubs leave out


class ApplicationEntityForm(ConfigModelForm):
    class Meta:
        model = ApplicationEntity
        fields = ApplicationEntity.CONFIG_FIELDS
        labels = {
            "ae_title": "AE title",
            "host": "Host name or IP address",
            "port": "DICOM port",
            "may_send": "May send to us",
            "check_peer_ip": "Check the sender's IP address",
            "receives_results": "Receives results",
            "may_query": "May be queried",
            "tls": "DICOM TLS",
            "tls_certificate_name": "TLS certificate name",
            "quiet_period_seconds": "Quiet period (seconds)",
        }

    def clean(self):
        cleaned = super().clean()
        assert cleaned is not None  # Form.clean returns cleaned_data
        # A sender without a host is refused by the model's clean(), which the site YAML shares.
        needs_address = cleaned.get("receives_results") or cleaned.get("may_query")
        if needs_address and not cleaned.get("host") and "host" not in self.errors:
            self.add_error("host", "This node receives results or is queried: give its host.")
        if needs_address and not cleaned.get("port") and "port" not in self.errors:
            self.add_error("port", "We connect to this node: give its DICOM port.")
        return cleaned

    def warnings(self) -> list[str]:
        """What is allowed but probably a slip: shown after saving, never refused."""
        warning = ae_title_warning(self.cleaned_data.get("ae_title") or "")
        return [warning] if warning else []


class RoutingRuleForm(ConfigModelForm):
    # The relation lives on Destination (results app); the rule form edits it from this side.
    destinations: forms.ModelMultipleChoiceField[Destination] = forms.ModelMultipleChoiceField(
        queryset=None,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="Where the results of this rule go",
    )

    class Meta:
        model = RoutingRule
        fields = [
            "name",
            "description",
            "enabled",
            "priority",
            "stop_at_first_match",
            "ai_models",
            "shadow",
            "shadow_ai_models",
        ]
        widgets = {
            "description": forms.Textarea(attrs={"rows": 2}),
            "ai_models": forms.CheckboxSelectMultiple,
            "shadow_ai_models": forms.CheckboxSelectMultiple,
        }
        labels = {
            "ai_models": "AI models",
            "stop_at_first_match": "Stop at the first match",
            "shadow": "Shadow mode (run and record, deliver nothing)",
            "shadow_ai_models": "AI models run in shadow beside the live ones",
        }

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        destinations = cast("forms.ModelMultipleChoiceField[Destination]", self.fields["destinations"])
        destinations.queryset = Destination.objects.all()
        if self.instance.pk:
            self.fields["destinations"].initial = list(self.instance.destinations.values_list("pk", flat=True))

    def clean(self) -> dict:
        cleaned = super().clean()
        assert cleaned is not None  # ModelForm.clean returns cleaned_data
        both = set(cleaned.get("ai_models") or []) & set(cleaned.get("shadow_ai_models") or [])
        if both:
            names = ", ".join(sorted(f"{m.name} {m.version}" for m in both))
            self.add_error("shadow_ai_models", f"A model runs live or in shadow on a rule, not both: {names}.")
        return cleaned

    def save(self, commit: bool = True) -> RoutingRule:
        rule = super().save(commit=commit)
        if commit:
            rule.destinations.set(self.cleaned_data["destinations"])
        return rule


class RuleConditionForm(forms.ModelForm):
    class Meta:
        model = RuleCondition
        fields = ["attribute", "operator", "value"]


RuleConditionFormSet = forms.inlineformset_factory(
    RoutingRule, RuleCondition, form=RuleConditionForm, extra=2, can_delete=True
)


class DryRunForm(forms.Form):
    study = forms.CharField(
        required=False,
        max_length=64,
        label="Accession number, Study UID or study id",
        help_text="Empty: the most recent studies",
    )


SECRET_PLACEHOLDER = "(unchanged)"
SECRET_NAMES = {"secret": "password or token", "oauth_client_secret": "OAuth client secret"}


def _write_only(label: str) -> forms.CharField:
    return forms.CharField(
        required=False,
        label=label,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only: never shown again. Leave empty to keep the current one.",
    )


# The HTTPS client fields a DICOMweb or FHIR destination and a DICOMweb poll source share
# (routing.models.oauth.HttpClientAuth): OAuth 2.0 client credentials and the CA bundle.
HTTP_AUTH_WIDGETS = {
    "ca_bundle": forms.Textarea(
        attrs={"rows": 4, "spellcheck": "false", "placeholder": "-----BEGIN CERTIFICATE-----", "class": "mono"}
    ),
}


class WriteOnlySecretsForm(ConfigModelForm):
    """Secrets are write-only: never rendered back, kept as they are when left empty on edit, and
    asked for again when the row's target changes (the model's TARGET_FIELDS), so a stored secret
    never goes to a new target. Subclasses say which secrets their current values need."""

    SECRETS: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name in self.SECRETS:
            if name in self.fields and self._stored(name):
                self.fields[name].widget.attrs["placeholder"] = SECRET_PLACEHOLDER

    def _stored(self, name: str) -> str:
        """The stored secret ("" for a new row); an UnreadableSecret is "" but truthy here."""
        stored = getattr(self.instance, name) if self.instance.pk else ""
        return stored if not isinstance(stored, UnreadableSecret) else stored or "(unreadable)"

    def secret_needed(self, name: str, cleaned: dict) -> bool:
        raise NotImplementedError

    def clean(self) -> dict:
        cleaned = super().clean()
        assert cleaned is not None  # ModelForm.clean returns cleaned_data
        moved = self.instance.pk and set(type(self.instance).TARGET_FIELDS) & set(self.changed_data)
        for name in self.SECRETS:
            if name not in self.fields or cleaned.get(name):
                continue
            if not moved:
                cleaned[name] = getattr(self.instance, name) if self.instance.pk else ""
            elif self.secret_needed(name, cleaned) and self._stored(name):
                self.add_error(
                    name,
                    f"The target or authentication changed: enter the {SECRET_NAMES.get(name, 'secret')} again "
                    "(the stored one is never sent to a new target).",
                )
        return cleaned


class PollSourceForm(WriteOnlySecretsForm):
    dicomweb_url = forms.URLField(
        required=False,
        assume_scheme="https",
        label="DICOMweb URL",
        help_text="DICOMweb base URL, e.g. https://pacs/dicom-web",
    )
    oauth_client_secret = _write_only("OAuth client secret")
    SECRETS = ("oauth_client_secret",)

    class Meta:
        model = PollSource
        fields = [
            "name",
            "kind",
            "enabled",
            "pacs",
            "retrieve_mode",
            "move_destination",
            "dicomweb_url",
            "dicomweb_token_env",
            *HttpClientAuth.HTTP_AUTH_FIELDS,
            "interval_seconds",
            "modalities",
            "lookback_hours",
            "max_studies_per_poll",
            "max_concurrent_retrieves",
            "min_query_spacing_seconds",
        ]
        labels = {
            "pacs": "PACS (AE title)",
            "retrieve_mode": "Retrieve with",
            "move_destination": "C-MOVE destination (our AE title)",
            "dicomweb_token_env": "DICOMweb token (environment variable)",
            "interval_seconds": "Poll every (seconds)",
            "lookback_hours": "Look back (hours)",
            "max_studies_per_poll": "Studies retrieved per poll at most",
            "max_concurrent_retrieves": "Retrieves at once at most",
            "min_query_spacing_seconds": "Seconds between two queries at least",
        }
        widgets = HTTP_AUTH_WIDGETS

    def secret_needed(self, name: str, cleaned: dict) -> bool:
        return bool(cleaned.get("oauth_token_url"))


# The destination form, declared per kind. To add a field for one kind: the model field, its name
# in that kind's list here, and a label in DestinationForm.Meta.labels; the form, the page and the
# kind switch follow. (The site YAML lists its fields in pacslens/site_config/destinations.py.)
DESTINATION_COMMON_FIELDS = ["name", "kind", "enabled", "description", "rules"]
DESTINATION_KIND_FIELDS: dict[str, list[str]] = {
    DestinationKind.DICOM: ["application_entity", "send_summary_image", "send_key_objects"],
    DestinationKind.DICOMWEB: [
        "base_url",
        "auth",
        "username",
        "secret",
        *HttpClientAuth.HTTP_AUTH_FIELDS,
        "send_summary_image",
        "send_key_objects",
    ],
    DestinationKind.HL7: [
        "host",
        "port",
        "hl7_message_type",
        "hl7_version",
        "sending_application",
        "sending_facility",
        "receiving_application",
        "receiving_facility",
        "accession_field",
        "on_ack_error",
        "on_ack_reject",
    ],
    DestinationKind.FHIR: ["base_url", "auth", "username", "secret", *HttpClientAuth.HTTP_AUTH_FIELDS],
}
DESTINATION_RETRY_FIELDS = [
    "timeout_seconds",
    "max_attempts",
    "backoff_base_seconds",
    "backoff_cap_seconds",
    "breaker_threshold",
    "breaker_cooldown_seconds",
]


class DestinationForm(WriteOnlySecretsForm):
    """One form, the fields of the chosen kind only (DESTINATION_KIND_FIELDS). Model validation
    (`Destination.clean`) reports per kind, next to the field it concerns. The secrets (password
    or token, OAuth client secret) are write-only (WriteOnlySecretsForm)."""

    COMMON_FIELDS = DESTINATION_COMMON_FIELDS
    KIND_FIELDS = DESTINATION_KIND_FIELDS
    RETRY_FIELDS = DESTINATION_RETRY_FIELDS
    # Changing this field re-renders the form with that kind's fields (config_edit's `_refresh`).
    refresh_field = "kind"
    # What a new destination starts with, beyond the model defaults.
    NEW_DEFAULTS = {"hl7_message_type": "ORU^R01"}

    secret = _write_only("Password or token")
    oauth_client_secret = _write_only("OAuth client secret")
    SECRETS = ("secret", "oauth_client_secret")

    class Meta:
        model = Destination
        fields = list(
            dict.fromkeys(
                DESTINATION_COMMON_FIELDS
                + [name for names in DESTINATION_KIND_FIELDS.values() for name in names]
                + DESTINATION_RETRY_FIELDS
            )
        )
        labels = {
            "rules": "Routing rules",
            "application_entity": "PACS (AE title)",
            "base_url": "Base URL",
            "auth": "Authentication",
            "username": "User name",
            "host": "RIS host name or IP address",
            "port": "MLLP port",
            "hl7_message_type": "HL7 message type",
            "hl7_version": "HL7 version",
            "sending_application": "Sending application (MSH-3)",
            "sending_facility": "Sending facility (MSH-4)",
            "receiving_application": "Receiving application (MSH-5)",
            "receiving_facility": "Receiving facility (MSH-6)",
            "accession_field": "Accession number field",
            "on_ack_error": "On an error ACK (AE/CE)",
            "on_ack_reject": "On a reject ACK (AR/CR)",
            "timeout_seconds": "Timeout (seconds)",
            "max_attempts": "Attempts before the failure queue",
            "backoff_base_seconds": "First retry after (seconds)",
            "backoff_cap_seconds": "Longest wait between retries (seconds)",
            "breaker_threshold": "Failures in a row that open the circuit",
            "breaker_cooldown_seconds": "Circuit stays open for (seconds)",
            "send_summary_image": "Also send a summary image (Secondary Capture)",
            "send_key_objects": "Also send a key object selection (KOS) when flagged",
        }
        help_texts = {"application_entity": "The PACS's AE title (add it under AE titles, with host and port)"}
        widgets = {
            "rules": forms.CheckboxSelectMultiple,
            "accession_field": forms.Select(choices=[(f, f) for f in ACCESSION_FIELDS]),
            # Browsers offer the admin's own login here otherwise.
            "username": forms.TextInput(attrs={"autocomplete": "off"}),
            **HTTP_AUTH_WIDGETS,
        }

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not self.instance.pk:
            for name, value in self.NEW_DEFAULTS.items():
                self.initial[name] = self.initial.get(name) or value
        self.chosen_kind = self._chosen_kind()
        shown = set(self.COMMON_FIELDS + self.KIND_FIELDS[self.chosen_kind] + self.RETRY_FIELDS)
        for name in list(self.fields):
            if name not in shown:
                del self.fields[name]

    def _chosen_kind(self) -> str:
        kind = self.data.get("kind") if self.is_bound else self.initial.get("kind")
        if kind in self.KIND_FIELDS:
            return kind
        return self.instance.kind if self.instance.kind in self.KIND_FIELDS else DestinationKind.DICOM

    @property
    def fieldsets(self) -> list[tuple[str, list[forms.BoundField]]]:
        """(legend, fields): what every destination has, what its kind needs, how it retries."""
        groups = [
            ("Destination", self.COMMON_FIELDS),
            (DestinationKind(self.chosen_kind).label, self.KIND_FIELDS[self.chosen_kind]),
            ("Retries and circuit breaker", self.RETRY_FIELDS),
        ]
        return [(legend, [self[name] for name in names if name in self.fields]) for legend, names in groups]

    def clean(self) -> dict:
        cleaned = super().clean()
        assert cleaned is not None  # ModelForm.clean returns cleaned_data
        if "secret" not in self.fields:
            # A kind without authentication: no secret is sent, none is kept for a later switch back.
            self.instance.secret, self.instance.auth, self.instance.username = "", AuthKind.NONE, ""
            self.instance.oauth_client_secret = ""
        return cleaned

    def secret_needed(self, name: str, cleaned: dict) -> bool:
        auth = cleaned.get("auth", AuthKind.NONE)
        return auth == AuthKind.OAUTH2 if name == "oauth_client_secret" else auth in (AuthKind.BASIC, AuthKind.BEARER)


class DiscardForm(forms.Form):
    reason = forms.CharField(
        max_length=2000,
        strip=True,
        widget=forms.TextInput(attrs={"placeholder": "Why this result will not be delivered"}),
        error_messages={"required": "A reason is required to discard a delivery."},
    )


_DATE_ERROR = {"invalid": "Enter a date as YYYY-MM-DD."}
_NUMBER_ERROR = {"invalid": "Enter a number, such as 0.5."}


class TriageFilterForm(forms.Form):
    model = forms.ModelChoiceField(queryset=AIModel.objects.all(), required=False, empty_label="any")
    date_from = forms.DateField(
        required=False, label="From date", widget=forms.DateInput(attrs={"type": "date"}), error_messages=_DATE_ERROR
    )
    date_to = forms.DateField(
        required=False, label="To date", widget=forms.DateInput(attrs={"type": "date"}), error_messages=_DATE_ERROR
    )
    flag = forms.ChoiceField(required=False, choices=[("", "any"), ("yes", "flagged"), ("no", "not flagged")])
    score_min = forms.FloatField(
        required=False,
        label="Minimum score",
        widget=forms.NumberInput(attrs={"step": "0.01"}),
        error_messages=_NUMBER_ERROR,
    )
    score_max = forms.FloatField(
        required=False,
        label="Maximum score",
        widget=forms.NumberInput(attrs={"step": "0.01"}),
        error_messages=_NUMBER_ERROR,
    )

    def clean(self):
        cleaned = super().clean()
        assert cleaned is not None  # Form.clean returns cleaned_data
        low, high = cleaned.get("score_min"), cleaned.get("score_max")
        if low is not None and high is not None and low > high:
            self.add_error("score_max", "The maximum score is below the minimum.")
        start, end = cleaned.get("date_from"), cleaned.get("date_to")
        if start and end and start > end:
            self.add_error("date_to", "The end date is before the start date.")
        return cleaned

    def error_lines(self) -> list[str]:
        """Each error in words, named by the field's label (never its internal name)."""
        return [
            f"{self.fields[name].label or name}: {message}"
            for name, errors in self.errors.items()
            for message in errors
        ]

    def filter(self, results: QuerySet[InferenceResult]) -> QuerySet[InferenceResult]:
        """The results the filter selects; none while the filter is not valid (never all of them)."""
        if not self.is_valid():
            return results.none()
        data = self.cleaned_data
        if data.get("model"):
            results = results.filter(model=data["model"])
        if data.get("date_from"):
            results = results.filter(created_at__date__gte=data["date_from"])
        if data.get("date_to"):
            results = results.filter(created_at__date__lte=data["date_to"])
        if data.get("flag"):
            results = results.filter(flagged=data["flag"] == "yes")
        if data.get("score_min") is not None:
            results = results.filter(score__gte=data["score_min"])
        if data.get("score_max") is not None:
            results = results.filter(score__lte=data["score_max"])
        return results

    def describe(self) -> str:
        """The filters as audit text: model, dates, flag, scores; never patient data."""
        if not self.is_valid():
            return "filters: not valid, nothing shown"
        parts = [f"{k}={v}" for k, v in self.cleaned_data.items() if v not in (None, "")]
        return "filters: " + (", ".join(parts) if parts else "none")
