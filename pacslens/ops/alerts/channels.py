"""Sending one alert to one channel: e-mail through Django's SMTP backend, or a JSON POST in the
generic shape, the shape Slack incoming webhooks take, or the Adaptive Card message Microsoft
Teams workflow webhooks ("When a Teams webhook request is received") take.

`channel_send` raises ChannelError with a message safe to show and store: a webhook URL is the
credential of Slack and Teams webhooks, so it never appears in an error (requests' exceptions
quote it, hence only their class name is kept).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import requests
from django.conf import settings
from django.core.mail import EmailMessage, get_connection

from results.models import AlertChannel, AlertChannelKind, WebhookFormat

WEBHOOK_TIMEOUT = 10.0


class ChannelError(Exception):
    pass


@dataclass(frozen=True)
class AlertMessage:
    kind: str  # started, cleared or test
    condition: str
    subject: str
    title: str
    text: str
    at: datetime

    @property
    def site(self) -> str:
        return settings.ALERT_SITE_NAME or socket.gethostname()

    @property
    def headline(self) -> str:
        return f"[PacsLens {self.site}] {self.title}"


def channel_send(channel: AlertChannel, message: AlertMessage) -> None:
    if channel.kind == AlertChannelKind.EMAIL:
        _send_email(channel, message)
    else:
        _send_webhook(channel, message)


def webhook_body(fmt: str, message: AlertMessage) -> dict[str, Any]:
    if fmt == WebhookFormat.SLACK:
        # Incoming webhooks take `text` (mrkdwn); `blocks` would need the same text again.
        return {"text": f"*{_slack_escape(message.headline)}*\n{_slack_escape(message.text)}"}
    if fmt == WebhookFormat.TEAMS:
        colour = {"started": "Attention", "cleared": "Good"}.get(message.kind, "Default")
        card = {
            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
            "type": "AdaptiveCard",
            "version": "1.4",
            "body": [
                {"type": "TextBlock", "text": message.headline, "weight": "Bolder", "wrap": True, "color": colour},
                {"type": "TextBlock", "text": message.text, "wrap": True},
                {"type": "TextBlock", "text": f"{message.at:%Y-%m-%d %H:%M:%S %Z}", "isSubtle": True, "wrap": True},
            ],
        }
        return {
            "type": "message",
            "attachments": [
                {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}
            ],
        }
    return {
        "source": "pacslens",
        "site": message.site,
        "state": message.kind,
        "condition": message.condition,
        "subject": message.subject,
        "title": message.title,
        "text": message.text,
        "at": message.at.isoformat(),
    }


def _send_email(channel: AlertChannel, message: AlertMessage) -> None:
    email = EmailMessage(
        subject=message.headline,
        body=f"{message.text}\n\n{message.kind} at {message.at:%Y-%m-%d %H:%M:%S %Z} on {message.site}.\n",
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=channel.recipients,
    )
    try:
        with get_connection(fail_silently=False, timeout=settings.EMAIL_TIMEOUT) as connection:
            connection.send_messages([email])
    except OSError as exc:  # smtplib's errors are OSErrors too; their text names the server, not the recipients' data
        raise ChannelError(f"SMTP {settings.EMAIL_HOST}:{settings.EMAIL_PORT}: {exc}"[:300]) from None


def _send_webhook(channel: AlertChannel, message: AlertMessage) -> None:
    if channel.webhook_url_unreadable:
        raise ChannelError("the stored webhook URL cannot be decrypted with the configured keys: enter it again")
    try:
        response = requests.post(
            channel.webhook_url,
            json=webhook_body(channel.webhook_format, message),
            timeout=WEBHOOK_TIMEOUT,
            allow_redirects=False,
        )
    except requests.RequestException as exc:
        raise ChannelError(f"cannot reach the webhook ({type(exc).__name__})") from None
    if not 200 <= response.status_code < 300:
        raise ChannelError(f"the webhook answered HTTP {response.status_code}")


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
