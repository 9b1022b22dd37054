from __future__ import annotations

from django.core.management.base import BaseCommand

from pacslens.ops.alerts.service import alerts_check


class Command(BaseCommand):
    help = (
        "Evaluate the alert rules and send what changed (the workers do this every minute; run it "
        "from cron too, so a dead worker host is still reported)."
    )

    def handle(self, *args, **options) -> None:
        outcome = alerts_check()
        self.stdout.write(f"{outcome['changed']} alert(s) started or cleared, {outcome['sent']} notification(s) sent")
