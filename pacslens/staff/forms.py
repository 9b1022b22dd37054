"""Forms of the staff pages: study filters, AE titles, routing rules and their conditions,
destinations, the failure queue's discard, the triage-audit filters.

Validation lives on the models (`clean()`, validators); the forms show it inline, field by field.
"""

from __future__ import annotations

from typing import cast

from django import forms
from django.db.models import Exists, OuterRef, Q, QuerySet

from results.models import AIModel, AuthKind, Destination, InferenceResult
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
            studies = studies.filter(Q(accession_number__iexact=q) | Q(study_instance_uid=q))
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
            flagged = InferenceResult.objects.current().filter(study=OuterRef("pk"), flagged=True)
            studies = studies.filter(Exists(flagged)) if flag == "yes" else studies.exclude(Exists(flagged))
        return studies.order_by(STUDY_SORTS.get(data.get("sort") or "", "-first_received_at"), "-id")


class ApplicationEntityForm(forms.ModelForm):
    class Meta:
        model = ApplicationEntity
        fields = ApplicationEntity.CONFIG_FIELDS

    def clean(self):
        cleaned = super().clean()
        assert cleaned is not None  # Form.clean returns cleaned_data
        # A sender without a host is refused by the model's clean(), which the site YAML shares.
        needs_address = cleaned.get("receives_results") or cleaned.get("may_query")
        if needs_address and not cleaned.get("host"):
            self.add_error("host", "This node receives results or is queried: give its host.")
        if (cleaned.get("receives_results") or cleaned.get("may_query")) and not cleaned.get("port"):
            self.add_error("port", "We connect to this node: give its DICOM port.")
        port = cleaned.get("port")
        if port is not None and not 1 <= port <= 65535:
            self.add_error("port", "A TCP port is between 1 and 65535.")
        return cleaned


class RoutingRuleForm(forms.ModelForm):
    # The relation lives on Destination (results app); the rule form edits it from this side.
    destinations: forms.ModelMultipleChoiceField[Destination] = forms.ModelMultipleChoiceField(
        queryset=None,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="Where the results of this rule go",
    )

    class Meta:
        model = RoutingRule
        fields = ["name", "description", "enabled", "priority", "stop_at_first_match", "ai_models"]
        widgets = {"description": forms.Textarea(attrs={"rows": 2}), "ai_models": forms.CheckboxSelectMultiple}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        destinations = cast("forms.ModelMultipleChoiceField[Destination]", self.fields["destinations"])
        destinations.queryset = Destination.objects.all()
        if self.instance.pk:
            self.fields["destinations"].initial = list(self.instance.destinations.values_list("pk", flat=True))

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
    study = forms.IntegerField(required=False, min_value=1, label="Study id (empty: the most recent studies)")


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


class WriteOnlySecretsForm(forms.ModelForm):
    """Secrets are write-only: never rendered back, kept as they are when left empty on edit, and
    asked for again when the row's target changes (the model's TARGET_FIELDS), so a stored secret
    never goes to a new target. Subclasses say which secrets their current values need."""

    SECRETS: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name in self.SECRETS:
            stored = getattr(self.instance, name) if self.instance.pk else ""
            if stored or isinstance(stored, UnreadableSecret):
                self.fields[name].widget.attrs["placeholder"] = SECRET_PLACEHOLDER

    def secret_needed(self, name: str, cleaned: dict) -> bool:
        raise NotImplementedError

    def clean(self) -> dict:
        cleaned = super().clean()
        assert cleaned is not None  # ModelForm.clean returns cleaned_data
        moved = self.instance.pk and set(type(self.instance).TARGET_FIELDS) & set(self.changed_data)
        for name in self.SECRETS:
            if cleaned.get(name):
                continue
            stored = getattr(self.instance, name) if self.instance.pk else ""
            if not moved:
                cleaned[name] = stored
            elif self.secret_needed(name, cleaned) and (stored or isinstance(stored, UnreadableSecret)):
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
        widgets = HTTP_AUTH_WIDGETS

    def secret_needed(self, name: str, cleaned: dict) -> bool:
        return bool(cleaned.get("oauth_token_url"))


class DestinationForm(WriteOnlySecretsForm):
    """Model validation (`Destination.clean`) reports per kind, next to the field it concerns."""

    secret = _write_only("Password or token")
    oauth_client_secret = _write_only("OAuth client secret")
    SECRETS = ("secret", "oauth_client_secret")

    class Meta:
        model = Destination
        fields = [
            "name",
            "kind",
            "enabled",
            "description",
            "application_entity",
            "base_url",
            "auth",
            "username",
            "secret",
            *HttpClientAuth.HTTP_AUTH_FIELDS,
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
            "timeout_seconds",
            "max_attempts",
            "backoff_base_seconds",
            "backoff_cap_seconds",
            "breaker_threshold",
            "breaker_cooldown_seconds",
            "rules",
        ]
        widgets = {"rules": forms.CheckboxSelectMultiple, **HTTP_AUTH_WIDGETS}

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


class TriageFilterForm(forms.Form):
    model = forms.ModelChoiceField(queryset=AIModel.objects.all(), required=False, empty_label="any")
    date_from = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    flag = forms.ChoiceField(required=False, choices=[("", "any"), ("yes", "flagged"), ("no", "not flagged")])
    score_min = forms.FloatField(required=False, widget=forms.NumberInput(attrs={"step": "0.01"}))
    score_max = forms.FloatField(required=False, widget=forms.NumberInput(attrs={"step": "0.01"}))

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

    def filter(self, results: QuerySet[InferenceResult]) -> QuerySet[InferenceResult]:
        data = self.cleaned_data if self.is_valid() else {}
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
        data = self.cleaned_data if self.is_valid() else {}
        parts = [f"{k}={v}" for k, v in data.items() if v not in (None, "")]
        return "filters: " + (", ".join(parts) if parts else "none")
