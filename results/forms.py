"""Forms of the results pages: destinations, the failure queue's discard, the triage-audit filters."""

from __future__ import annotations

from django import forms
from django.db.models import QuerySet

from results.models import AIModel, Destination, InferenceResult

SECRET_PLACEHOLDER = "(unchanged)"


class DestinationForm(forms.ModelForm):
    """Model validation (`Destination.clean`) reports per kind, next to the field it concerns.
    The secret is write-only: it is never rendered back, and left empty on edit it stays as it was."""

    secret = forms.CharField(
        required=False, label="Password or token",
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only: never shown again. Leave empty to keep the current one.",
    )

    class Meta:
        model = Destination
        fields = [
            "name", "kind", "enabled", "description", "application_entity", "base_url", "auth", "username", "secret",
            "host", "port", "hl7_message_type", "hl7_version", "sending_application", "sending_facility",
            "receiving_application", "receiving_facility", "accession_field", "on_ack_error", "on_ack_reject",
            "timeout_seconds", "max_attempts", "backoff_base_seconds", "backoff_cap_seconds",
            "breaker_threshold", "breaker_cooldown_seconds", "rules",
        ]
        widgets = {"rules": forms.CheckboxSelectMultiple}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stored_secret = self.instance.secret if self.instance.pk else ""
        if self._stored_secret:
            self.fields["secret"].widget.attrs["placeholder"] = SECRET_PLACEHOLDER

    def clean_secret(self) -> str:
        return self.cleaned_data.get("secret") or self._stored_secret


class DiscardForm(forms.Form):
    reason = forms.CharField(
        max_length=2000, strip=True, widget=forms.TextInput(attrs={"placeholder": "Why this result will not be delivered"}),
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
