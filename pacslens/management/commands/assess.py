"""`manage.py assess NODE`: probe a PACS or RIS without storing anything and report what works."""

from __future__ import annotations

import json as jsonlib

from django.core.management.base import BaseCommand, CommandError

from pacslens.ops.assess import DEFAULT_TIMEOUT, UnknownNode, node_assess


class Command(BaseCommand):
    help = (
        "Probe a configured PACS or RIS (AE title, destination or poll source name) without storing anything: "
        "C-ECHO, C-FIND, C-MOVE, C-GET, storage negotiation, DICOMweb, FHIR, MLLP."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("node", help="An AE title, a destination name or a poll source name")
        parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="Seconds per probe step")
        parser.add_argument("--dicomweb", default="", help="Also probe this DICOMweb base URL")
        parser.add_argument("--fhir", default="", help="Also probe this FHIR base URL")
        parser.add_argument("--mllp", default="", help="Also probe this MLLP HOST:PORT")
        parser.add_argument("--json", action="store_true", help="Machine-readable output")

    def handle(
        self, *args, node: str, timeout: float, dicomweb: str, fhir: str, mllp: str, json: bool, **options
    ) -> None:
        try:
            report = node_assess(
                node=node, timeout=timeout, dicomweb_url=dicomweb, fhir_url=fhir, mllp=_host_port(mllp)
            )
        except UnknownNode as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(_json_dump(report.as_dict()) if json else report.as_text())


def _host_port(value: str) -> tuple[str, int] | None:
    if not value:
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise CommandError(f"--mllp {value!r}: use HOST:PORT")
    return host, int(port)


def _json_dump(data: dict) -> str:
    return jsonlib.dumps(data, indent=2)
