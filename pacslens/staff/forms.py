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
    PollSource,
    RoutingRule,
    RuleCondition,
    Study,
    StudyState,
)

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


class PollSourceForm(forms.ModelForm):
    dicomweb_url = forms.URLField(
        required=False,
        assume_scheme="https",
        label="DICOMweb URL",
        help_text="DICOMweb base URL, e.g. https://pacs/dicom-web",
    )

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
            "interval_seconds",
            "modalities",
            "lookback_hours",
            "max_studies_per_poll",
            "max_concurrent_retrieves",
            "min_query_spacing_seconds",
        ]


SECRET_PLACEHOLDER = "(unchanged)"


class DestinationForm(forms.ModelForm):
    """Model validation (`Destination.clean`) reports per kind, next to the field it concerns.
    The secret is write-only: it is never rendered back, and left empty on edit it stays as it was."""

    secret = forms.CharField(
        required=False,
        label="Password or token",
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only: never shown again. Leave empty to keep the current one.",
    )

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
        widgets = {"rules": forms.CheckboxSelectMultiple}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stored_secret = self.instance.secret if self.instance.pk else ""
        if self._stored_secret or (self.instance.pk and self.instance.secret_unreadable):
            self.fields["secret"].widget.attrs["placeholder"] = SECRET_PLACEHOLDER

    def clean(self) -> dict:
        cleaned = super().clean()
        assert cleaned is not None  # ModelForm.clean returns cleaned_data
        if cleaned.get("secret"):
            return cleaned
        # The stored secret stays only while it goes where, and how, it went before.
        moved = self.instance.pk and set(Destination.TARGET_FIELDS) & set(self.changed_data)
        if not moved:
            cleaned["secret"] = self.instance.secret if self.instance.pk else ""
        elif cleaned.get("auth", AuthKind.NONE) != AuthKind.NONE and (
            self._stored_secret or self.instance.secret_unreadable
        ):
            self.add_error(
                "secret",
                "The target or authentication changed: enter the password or token again "
                "(the stored one is never sent to a new target).",
            )
        return cleaned


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
