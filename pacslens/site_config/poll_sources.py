"""The `poll_sources` section of the site YAML (export_config / import_config).

    poll_sources:
    - name: main-pacs
      kind: dimse                 # dimse | dicomweb
      enabled: true
      pacs: PACS1                 # an ae_titles entry marked may_query (dimse)
      retrieve_mode: c-move       # c-move | c-get
      move_destination: ''        # empty: our own AE title
      dicomweb_url: ''            # dicomweb: e.g. https://pacs/dicom-web
      dicomweb_token_env: ''      # dicomweb: PACSLENS_POLL_TOKEN_<NAME>, the variable holding the token
      oauth_token_url: ''         # dicomweb: OAuth 2.0 client credentials instead of a token variable
      oauth_client_id: ''
      oauth_scope: ''
      oauth_audience: ''
      ca_bundle: ''               # PEM of the CA that signs the server's HTTPS certificate
      interval_seconds: 60
      modalities: CT\\MR
      lookback_hours: 24
      extra_filters: {}           # DICOM keyword: match value
      max_studies_per_poll: 10
      max_concurrent_retrieves: 1
      min_query_spacing_seconds: 5

Worker state (leases, watermark, next poll) is not configuration and is neither exported nor
imported. No secret is exported: a DICOMweb token is named by its environment variable, STOW-RS
sender tokens (manage.py stow_token) are not part of the YAML at all, and an OAuth client secret
is import-only (`oauth_client_secret`): a file without it keeps the stored one, unless the entry
changes the URL, token URL or client id (PollSource.TARGET_FIELDS): then the file must give it.
"""

from __future__ import annotations

from typing import Any

from pacslens.site_config.checks import clean_problems, entries_labelled
from routing.models import ApplicationEntity, PollSource

FIELDS = [
    "name",
    "kind",
    "enabled",
    "pacs",
    "retrieve_mode",
    "move_destination",
    "dicomweb_url",
    "dicomweb_token_env",
    "oauth_token_url",
    "oauth_client_id",
    "oauth_scope",
    "oauth_audience",
    "ca_bundle",
    "interval_seconds",
    "modalities",
    "lookback_hours",
    "extra_filters",
    "max_studies_per_poll",
    "max_concurrent_retrieves",
    "min_query_spacing_seconds",
]
IMPORT_ONLY = {"oauth_client_secret"}


class PollSourcesSection:
    name = "poll_sources"
    needs_document = True

    def export(self) -> list[dict[str, Any]]:
        entries = []
        for source in PollSource.objects.select_related("pacs").order_by("name"):
            entry = {f: getattr(source, f) for f in FIELDS if f != "pacs"}
            entry["pacs"] = source.pacs.ae_title if source.pacs else None
            entries.append({f: entry[f] for f in FIELDS})
        return entries

    def validate(self, entries: list[Any], *, document: dict[str, Any] | None = None) -> list[str]:
        in_file = {e.get("ae_title"): e for e in (document or {}).get("ae_titles") or [] if isinstance(e, dict)}
        problems: list[str] = []
        for label, entry in entries_labelled(self.name, entries, problems, key=lambda e: e.get("name")):
            unknown = sorted(set(entry) - set(FIELDS) - IMPORT_ONLY)
            if unknown:
                problems.append(f"{label}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
                continue
            if "name" not in entry:
                problems.append(f"{label}: field 'name' is required")
                continue
            pacs = entry.get("pacs")
            if pacs and pacs not in in_file and not ApplicationEntity.objects.filter(ae_title=pacs).exists():
                problems.append(f"{label}: field 'pacs': no AE title {pacs!r} here or in ae_titles")
                continue
            row = self._row(entry, pacs_from_file=in_file.get(pacs))
            if row.uses_oauth and row.pk and row.target_changed and "oauth_client_secret" not in entry:
                problems.append(
                    f"{label}: field 'oauth_client_secret': the URL, token URL or client id changed, "
                    "so the stored secret is not kept; give it"
                )
                continue
            problems.extend(clean_problems(row, label))
        return problems

    def apply(self, entries: list[dict[str, Any]], *, prune: bool) -> dict[str, int]:
        created = updated = 0
        for entry in entries:
            row = self._row(entry)
            row.full_clean(validate_unique=False, validate_constraints=False)
            values = {f: getattr(row, f) for f in [*FIELDS, *IMPORT_ONLY] if f != "name"}
            _, was_created = PollSource.objects.update_or_create(name=row.name, defaults=values)
            created += was_created
            updated += not was_created
        deleted = 0
        if prune:
            deleted, _ = PollSource.objects.exclude(name__in=[e["name"] for e in entries]).delete()
        return {"created": created, "updated": updated, "deleted": deleted}

    def _row(self, entry: dict[str, Any], *, pacs_from_file: dict[str, Any] | None = None) -> PollSource:
        row = PollSource.objects.filter(name=entry.get("name")).first() or PollSource()
        for name, value in entry.items():
            if name != "pacs":
                setattr(row, name, value)
        # A stored client secret never follows the source to another server or client.
        if "oauth_client_secret" not in entry and row.pk and row.target_changed:
            row.oauth_client_secret = ""
        ae_title = entry.get("pacs")
        if not ae_title:
            row.pacs = None
        elif pacs_from_file is not None:  # validated against the file's own AE entry (the one applied)
            row.pacs = ApplicationEntity(ae_title=ae_title, may_query=bool(pacs_from_file.get("may_query", False)))
        else:
            row.pacs = ApplicationEntity.objects.filter(ae_title=ae_title).first()
        return row
