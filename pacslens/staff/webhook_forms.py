"""The webhook subscription form: the URL write-only (it may carry a credential), the signing
secret never shown but made (or remade) by the server. Validation lives on the model."""

from __future__ import annotations

from django import forms

from pacslens.staff.forms import SECRET_PLACEHOLDER
from results.models import EVENT_TYPES, WebhookEventType, WebhookSubscription


class WebhookSubscriptionForm(forms.ModelForm):
    webhook_url = forms.CharField(
        required=False,
        label="URL",
        max_length=2000,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text="https:// (or http://), called from the workers. Write-only: never shown again; "
        "leave empty to keep the current one.",
    )
    event_types = forms.MultipleChoiceField(
        label="Events", choices=WebhookEventType.choices, widget=forms.CheckboxSelectMultiple
    )
    rotate_secret = forms.BooleanField(
        required=False, label="Make a new signing secret (shown once; the receiver must switch to it)"
    )

    class Meta:
        model = WebhookSubscription
        fields = ["name", "webhook_url", "enabled"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["event_types"].initial = self.instance.event_types
        if self.instance.pk:
            self.fields["webhook_url"].widget.attrs["placeholder"] = SECRET_PLACEHOLDER
        else:
            del self.fields["rotate_secret"]  # a new subscription always gets one

    def clean(self) -> dict:
        cleaned = super().clean()
        assert cleaned is not None  # ModelForm.clean returns cleaned_data
        if not cleaned.get("webhook_url") and self.instance.pk:
            cleaned["webhook_url"] = self.instance.webhook_url
        chosen = set(cleaned.get("event_types") or [])
        if chosen:  # set before the model's validation, which runs after clean(); none: "required" says so
            self.instance.events = ",".join(event for event in EVENT_TYPES if event in chosen)
        return cleaned
