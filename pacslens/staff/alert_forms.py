"""Forms of the Alerts page: channels (the webhook URL write-only, as destination secrets are)
and rules. Validation lives on the models (results/models/alerts.py)."""

from __future__ import annotations

from django import forms

from pacslens.staff.forms import SECRET_PLACEHOLDER
from results.models import AlertChannel, AlertChannelKind, AlertRule


class AlertChannelForm(forms.ModelForm):
    webhook_url = forms.CharField(
        required=False,
        label="Webhook URL",
        max_length=2000,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text="Webhook channels. Write-only (a Slack or Teams webhook URL is a credential): "
        "never shown again; leave empty to keep the current one.",
    )

    class Meta:
        model = AlertChannel
        fields = ["name", "kind", "enabled", "email_to", "webhook_format", "webhook_url"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk and (self.instance.webhook_url or self.instance.webhook_url_unreadable):
            self.fields["webhook_url"].widget.attrs["placeholder"] = SECRET_PLACEHOLDER

    def clean(self) -> dict:
        cleaned = super().clean()
        assert cleaned is not None  # ModelForm.clean returns cleaned_data
        if not cleaned.get("webhook_url") and self.instance.pk and cleaned.get("kind") == AlertChannelKind.WEBHOOK:
            cleaned["webhook_url"] = self.instance.webhook_url
        return cleaned


class AlertRuleForm(forms.ModelForm):
    class Meta:
        model = AlertRule
        fields = AlertRule.CONFIG_FIELDS
        widgets = {
            "active_from": forms.TimeInput(attrs={"type": "time"}, format="%H:%M"),
            "active_to": forms.TimeInput(attrs={"type": "time"}, format="%H:%M"),
        }
