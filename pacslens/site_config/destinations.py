"""The `destinations` section of the site YAML.

    destinations:
    - name: main-pacs
      kind: dicom
      application_entity: PACS        # an ae_titles entry
      rules: [CT head]                # routing_rules that send here
    - name: ris
      kind: hl7
      host: ris.hospital.local
      port: 2575
      hl7_message_type: ORM^O01
      ...
    - name: cloud-fhir
      kind: fhir
      base_url: https://fhir.example/R4
      auth: oauth2                    # OAuth 2.0 client credentials
      oauth_token_url: https://login.example/oauth2/token
      oauth_client_id: pacslens
      oauth_scope: system/Observation.write system/ImagingStudy.write
      oauth_audience: ''
      ca_bundle: |                    # PEM: the CA of the server's (and token URL's) HTTPS certificate
        -----BEGIN CERTIFICATE-----
        ...

Secrets (passwords, bearer tokens, OAuth client secrets) are never exported. On import a `secret` given in the file
(or `oauth_client_secret`) is stored; when the file has none, the destination keeps the one it has, so an exported
file re-imports without wiping credentials -- unless the entry changes where or how the secret
is sent (Destination.TARGET_FIELDS): then the file must give the secret again.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction

from pacslens.site_config.checks import clean_problems, entries_labelled
from results.models import Destination
from routing.models import ApplicationEntity, RoutingRule

FIELDS = [
    "name",
    "kind",
    "enabled",
    "description",
    "application_entity",
    "rules",
    "send_summary_image",
    "send_key_objects",
    "base_url",
    "auth",
    "username",
    "oauth_token_url",
    "oauth_client_id",
    "oauth_scope",
    "oauth_audience",
    "ca_bundle",
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
]
IMPORT_ONLY = {"secret", "oauth_client_secret"}
REFERENCES = {"application_entity", "rules"}


class DestinationsSection:
    name = "destinations"
    needs_document = True

    def export(self) -> list[dict[str, Any]]:
        entries = []
        for destination in Destination.objects.select_related("application_entity").prefetch_related("rules"):
            entry = {f: getattr(destination, f) for f in FIELDS if f not in REFERENCES}
            entry["application_entity"] = (
                destination.application_entity.ae_title if destination.application_entity else None
            )
            entry["rules"] = sorted(rule.name for rule in destination.rules.all())
            entries.append({f: entry[f] for f in FIELDS})
        return entries

    def validate(self, entries: list[Any], *, document: dict[str, Any] | None = None) -> list[str]:
        document = document or {}
        known_aes = set(ApplicationEntity.objects.values_list("ae_title", flat=True)) | _names(
            document, "ae_titles", "ae_title"
        )
        known_rules = set(RoutingRule.objects.values_list("name", flat=True)) | _names(
            document, "routing_rules", "name"
        )
        problems: list[str] = []
        for label, entry in entries_labelled(self.name, entries, problems, key=lambda e: e.get("name")):
            unknown = sorted(set(entry) - set(FIELDS) - IMPORT_ONLY)
            if unknown:
                problems.append(f"{label}: unknown field(s) {', '.join(unknown)}")
                continue
            ae_title = entry.get("application_entity")
            if ae_title and ae_title not in known_aes:
                problems.append(f"{label}: field 'application_entity': no AE title {ae_title!r} here or in ae_titles")
            rules = entry.get("rules") or []
            if not isinstance(rules, list):
                problems.append(f"{label}: field 'rules': must be a list of routing rule names")
                rules = []
            for rule in rules:
                if rule not in known_rules:
                    problems.append(f"{label}: field 'rules': no routing rule named {rule!r}")
            # The AE reference is checked above; it may only exist once the import is applied.
            row, secret_dropped = destination_from_entry(entry, resolve_ae=False)
            if secret_dropped and row.auth != "none":
                field_name = "oauth_client_secret" if row.auth == "oauth2" else "secret"
                problems.append(
                    f"{label}: field '{field_name}': the target or auth changed, so the stored secret is not kept; give it"
                )
                continue  # (the model's own "needs the secret" would say the same again)
            problems.extend(clean_problems(row, label, exclude=["application_entity"]))
        return problems

    def apply(self, entries: list[dict[str, Any]], *, prune: bool) -> dict[str, int]:
        created = updated = 0
        names = []
        with transaction.atomic():
            for entry in entries:
                row, _ = destination_from_entry(entry, resolve_ae=True)
                was_new = row.pk is None
                row.full_clean(validate_unique=False, validate_constraints=False)
                row.save()
                row.rules.set(RoutingRule.objects.filter(name__in=entry.get("rules") or []))
                created += was_new
                updated += not was_new
                names.append(row.name)
            deleted = 0
            if prune:
                deleted, _ = Destination.objects.exclude(name__in=names).filter(deliveries=None).delete()
        return {"created": created, "updated": updated, "deleted": deleted}


def destination_from_entry(entry: dict[str, Any], *, resolve_ae: bool) -> tuple[Destination, bool]:
    """The destination as the entry would make it, and whether its stored secret was dropped."""
    row = Destination.objects.filter(name=entry.get("name")).first() or Destination()
    for field_name, value in entry.items():
        if field_name in REFERENCES:
            continue
        setattr(row, field_name, value)
    ae_title = entry.get("application_entity")
    if resolve_ae:
        row.application_entity = ApplicationEntity.objects.filter(ae_title=ae_title).first() if ae_title else None
    # A stored secret never follows the destination to a new target or auth.
    secret_field = "oauth_client_secret" if row.auth == "oauth2" else "secret"
    secret_dropped = secret_field not in entry and bool(row.pk) and row.target_changed
    if bool(row.pk) and row.target_changed:
        for field_name in ("secret", "oauth_client_secret"):
            if field_name not in entry:
                setattr(row, field_name, "")
    return row, secret_dropped


def _names(document: dict[str, Any], section: str, key: str) -> set[str | None]:
    return {e.get(key) for e in document.get(section) or [] if isinstance(e, dict)}
