"""Configuration: AE titles, destinations, routing rules, poll sources (read and write), models
(read), the routing dry run, and the whole site's YAML (export, import with a dry run first).

An object reads and writes as its entry in the site YAML (pacslens/site_config), and a write is
validated by that section exactly as `import_config` validates a file: one set of rules and
messages for the file, the API and (through the models' own validation) the UI forms. Each
object carries an ETag; PUT, PATCH and DELETE require `If-Match` with it, so two editors cannot
overwrite each other (412 when it changed, 428 without it). Secrets are write-only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from django.db import models, transaction
from django.db.models.deletion import ProtectedError, RestrictedError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from ninja import Body, Router

from pacslens.api import schemas
from pacslens.api.auth import require
from pacslens.api.problems import Problem, config_problems
from pacslens.site_config.document import SECTIONS, ConfigError, config_export, config_import
from results.models import AIModel, AlertChannel, AlertRule, Destination
from routing.models import ApplicationEntity, AuditAction, AuditEntry, PollSource, RoutingRule, Study
from routing.models.audit import config_snapshot
from routing.rules import study_explain_routing

router = Router(tags=["configuration"])
DRY_RUN_STUDIES = 10


@dataclass(frozen=True)
class ConfigKind:
    """One kind of configuration object: its URL, its site-YAML section, its model and key."""

    path: str
    section_name: str
    model: type[models.Model]
    key: str

    @property
    def section(self) -> Any:
        return next(s for s in SECTIONS if s.name == self.section_name)

    def perm(self, action: str) -> str:
        return f"{self.model._meta.app_label}.{action}_{self.model._meta.model_name}"


KINDS = [
    ConfigKind("ae-titles", "ae_titles", ApplicationEntity, "ae_title"),
    ConfigKind("destinations", "destinations", Destination, "name"),
    ConfigKind("routing-rules", "routing_rules", RoutingRule, "name"),
    ConfigKind("poll-sources", "poll_sources", PollSource, "name"),
]


def config_entry(kind: ConfigKind, obj: models.Model) -> dict[str, Any]:
    """The object as its entry in an exported site YAML."""
    key = getattr(obj, kind.key)
    return next(e for e in kind.section.export() if e[kind.key] == key)


def entry_etag(entry: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode()).hexdigest()
    return f'"{digest[:32]}"'


def _register(kind: ConfigKind) -> None:
    """The five operations of one kind (list, read, create, replace/patch, delete)."""
    name = kind.section_name.replace("_", " ")
    item = f"/config/{kind.path}/{{int:object_id}}"

    @router.get(
        f"/config/{kind.path}",
        response=list[schemas.ConfigObject],
        summary=f"List {name}",
        operation_id=f"{kind.section_name}_list",
    )
    def list_objects(request: HttpRequest):
        require(request, kind.perm("view"))
        by_key = {getattr(o, kind.key): o.pk for o in kind.model._default_manager.all()}
        return [{"id": by_key[e[kind.key]], "etag": entry_etag(e), "entry": e} for e in kind.section.export()]

    @router.get(
        item, response=schemas.ConfigObject, summary=f"Read one of the {name}", operation_id=f"{kind.section_name}_read"
    )
    def read_object(request: HttpRequest, response: HttpResponse, object_id: int):
        require(request, kind.perm("view"))
        return _answer(kind, get_object_or_404(kind.model, pk=object_id), response)

    @router.post(
        f"/config/{kind.path}",
        response={201: schemas.ConfigObject},
        summary=f"Create one of the {name}",
        operation_id=f"{kind.section_name}_create",
    )
    def create_object(request: HttpRequest, response: HttpResponse, entry: dict[str, Any] = Body(...)):  # noqa: B008
        """The body is an entry of this section of the site YAML (docs/reference.md)."""
        client = require(request, kind.perm("view"), kind.perm("add"))
        obj = _save(kind, request, client.actor, entry)
        response["Location"] = request.build_absolute_uri(f"{request.path.rstrip('/')}/{obj.pk}")
        return 201, _answer(kind, obj, response)

    @router.put(
        item,
        response=schemas.ConfigObject,
        summary=f"Replace one of the {name}",
        operation_id=f"{kind.section_name}_replace",
    )
    def replace_object(
        request: HttpRequest,
        response: HttpResponse,
        object_id: int,
        entry: dict[str, Any] = Body(...),  # noqa: B008
    ):
        """The whole entry, as an import of this one entry would apply it. Needs `If-Match`."""
        client = require(request, kind.perm("view"), kind.perm("change"))
        return _answer(kind, _save(kind, request, client.actor, entry, object_id=object_id), response)

    @router.patch(
        item,
        response=schemas.ConfigObject,
        summary=f"Change fields of one of the {name}",
        operation_id=f"{kind.section_name}_patch",
    )
    def patch_object(
        request: HttpRequest,
        response: HttpResponse,
        object_id: int,
        changes: dict[str, Any] = Body(...),  # noqa: B008
    ):
        """The fields given replace the object's; the others stay. Needs `If-Match`."""
        client = require(request, kind.perm("view"), kind.perm("change"))
        return _answer(kind, _save(kind, request, client.actor, changes, object_id=object_id, patch=True), response)

    @router.delete(
        item, response={204: None}, summary=f"Delete one of the {name}", operation_id=f"{kind.section_name}_delete"
    )
    def delete_object(request: HttpRequest, object_id: int):
        """Needs `If-Match`. 409 while other rows still refer to it (deliveries, destinations)."""
        client = require(request, kind.perm("view"), kind.perm("delete"))
        try:
            with transaction.atomic():
                obj = _locked(kind, request, object_id)
                before = config_snapshot(obj)
                obj.delete()
                AuditEntry.record(
                    actor=client.actor,
                    action=AuditAction.DELETE,
                    object_repr=str(getattr(obj, kind.key)),
                    detail=f"{kind.model._meta.label_lower} {object_id}",
                    before=before,
                    request=request,
                )
        except (ProtectedError, RestrictedError) as exc:
            users = sorted({o._meta.verbose_name_plural for o in exc.args[1]})
            raise Problem(409, f"{getattr(obj, kind.key)} is still in use by {', '.join(map(str, users))}.") from None
        return 204, None


# The Alerts page's configuration: not part of the site permissions above (an export or import
# of the whole site keeps needing what it needed), registered the same way.
ALERT_KINDS = [
    ConfigKind("alert-channels", "alert_channels", AlertChannel, "name"),
    ConfigKind("alert-rules", "alert_rules", AlertRule, "name"),
]
for _kind in KINDS + ALERT_KINDS:
    _register(_kind)


@router.get("/config/models", response=list[schemas.ConfigObject], summary="List registered models")
def model_list(request: HttpRequest):
    """Registered models as in the site YAML (read-only: register with `manage.py register_model`)."""
    require(request, "results.view_aimodel")
    ids = {(m.name, m.version): m.pk for m in AIModel.objects.all()}
    entries = SECTIONS_BY_NAME["models"].export()
    return [{"id": ids[(e["name"], e["version"])], "etag": entry_etag(e), "entry": e} for e in entries]


@router.get("/config/models/{int:model_id}", response=schemas.ConfigObject, summary="Read one registered model")
def model_read(request: HttpRequest, response: HttpResponse, model_id: int):
    require(request, "results.view_aimodel")
    model = get_object_or_404(AIModel, pk=model_id)
    entry = next(
        e for e in SECTIONS_BY_NAME["models"].export() if (e["name"], e["version"]) == (model.name, model.version)
    )
    response["ETag"] = entry_etag(entry)
    return {"id": model.pk, "etag": entry_etag(entry), "entry": entry}


@router.get("/config/routing-rules/dry-run", response=list[schemas.DryRun], summary="Routing dry run")
def routing_dry_run(request: HttpRequest, study: int | None = None):
    """Every rule against one study (or the 10 most recent): matched or not, per condition, with
    the value seen (patient attributes are not spelled out)."""
    require(request, "routing.view_routingrule", "routing.view_study")
    if study is not None:
        studies = [get_object_or_404(Study, pk=study)]
    else:
        studies = list(Study.objects.order_by("-first_received_at", "-id")[:DRY_RUN_STUDIES])
    answers = []
    for row in studies:
        explanation = study_explain_routing(study=row)
        answers.append(
            {
                "study_id": row.pk,
                "reason": explanation.reason,
                "verdicts": [
                    {
                        "rule": v.rule.name,
                        "matched": v.matched,
                        "counts": v.counts,
                        "skipped": v.skipped,
                        "conditions": [c.describe() for c in v.conditions],
                    }
                    for v in explanation.verdicts
                ],
            }
        )
    return answers


@router.get(
    "/config/site",
    summary="Export the site configuration (YAML)",
    response={200: str},
    openapi_extra={
        "responses": {
            "200": {"description": "The site YAML", "content": {"application/yaml": {"schema": {"type": "string"}}}}
        }
    },
)
def site_export(request: HttpRequest):
    """The document `manage.py export_config` writes (no secrets)."""
    client = require(request, *[k.perm("view") for k in KINDS], "results.view_aimodel")
    AuditEntry.record(actor=client.actor, action=AuditAction.EXPORT, detail="site configuration", request=request)
    return HttpResponse(config_export(), content_type="application/yaml; charset=utf-8")


@router.post(
    "/config/site/import",
    response=schemas.ImportSummary,
    summary="Import the site configuration (YAML); a dry run unless dry_run=false",
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/yaml": {"schema": {"type": "string"}}}},
    },
)
def site_import(request: HttpRequest, dry_run: bool = True, prune: bool = False):
    """As `manage.py import_config`: everything is validated first and any problem changes
    nothing (422, one entry in `errors` per problem). Without `dry_run=false` nothing is
    applied: check the summary, then send the same document again with `dry_run=false`."""
    perms = [k.perm(a) for k in KINDS for a in ("view", "add", "change")] + ["results.view_aimodel"]
    if prune:
        perms += [k.perm("delete") for k in KINDS]
    client = require(request, *perms)
    try:
        text = request.body.decode("utf-8")
    except UnicodeDecodeError:
        raise Problem(422, "The document is not UTF-8 text.") from None
    try:
        summary = config_import(text, prune=prune, dry_run=dry_run)
    except ConfigError as exc:
        raise Problem(
            422,
            f"{len(exc.problems)} problem(s), nothing was changed.",
            errors=[(_document_field(p), p) for p in exc.problems],
        ) from None
    if not dry_run:
        counts = "; ".join(f"{s}: {c['created']}+ {c['updated']}~ {c['deleted']}-" for s, c in summary.items())
        AuditEntry.record(
            actor=client.actor,
            action=AuditAction.IMPORT,
            detail=f"{'prune, ' if prune else ''}{counts}"[:2000],
            request=request,
        )
    return {"dry_run": dry_run, "sections": summary}


SECTIONS_BY_NAME = {s.name: s for s in SECTIONS}


# --- helpers ---------------------------------------------------------------------------------


def _answer(kind: ConfigKind, obj: models.Model, response: HttpResponse) -> dict[str, Any]:
    entry = config_entry(kind, obj)
    response["ETag"] = entry_etag(entry)
    return {"id": obj.pk, "etag": entry_etag(entry), "entry": entry}


def _locked(kind: ConfigKind, request: HttpRequest, object_id: int) -> models.Model:
    """The object, locked for this transaction, if `If-Match` names its current ETag (RFC 9110
    13.1.1). Checked inside the writing transaction, so of two editors holding the same ETag
    only the first wins (SQLite's IMMEDIATE transactions and PostgreSQL's row lock serialize them)."""
    given = request.headers.get("If-Match")
    if not given:
        raise Problem(428, "Send If-Match with the ETag you read, so a change made meanwhile is not overwritten.")
    obj = get_object_or_404(kind.model._default_manager.select_for_update(), pk=object_id)
    current = entry_etag(config_entry(kind, obj))
    if given.strip() != "*" and current not in [tag.strip() for tag in given.split(",")]:
        raise Problem(
            412, "It was changed since you read it: read it again and re-apply your change.", headers={"ETag": current}
        )
    return obj


def _save(
    kind: ConfigKind, request: HttpRequest, actor: str, body: Any, *, object_id: int | None = None, patch: bool = False
) -> models.Model:
    """Validate the entry as an import of that one entry would, then apply it and audit it: a new
    object, or (`object_id`) the object `If-Match` names, replaced or (`patch`) changed."""
    if not isinstance(body, dict):
        raise Problem(422, "The body must be a JSON object: an entry of the site YAML.")
    manager = kind.model._default_manager
    with transaction.atomic():
        obj = None if object_id is None else _locked(kind, request, object_id)
        before = None if obj is None else config_snapshot(obj)
        entry = {**config_entry(kind, obj), **body} if obj is not None and patch else dict(body)
        key = entry.get(kind.key) if obj is None else entry.setdefault(kind.key, getattr(obj, kind.key))
        label = f"{kind.section_name}[0]" + (f" ({key!r})" if key is not None else "")
        clash = manager.filter(**{kind.key: key})
        if obj is not None:
            clash = clash.exclude(pk=obj.pk)
        if key is not None and clash.exists():
            raise Problem(409, f"{key} already exists.", errors=[(kind.key, "Another object has this name.")])
        if obj is not None and key != getattr(obj, kind.key):
            # A rename: the section finds rows by name, so give the row its new name first
            # (rolled back with everything else if the entry is refused).
            manager.filter(pk=obj.pk).update(**{kind.key: key})
        section = kind.section
        document = {"pacslens_config": 1, kind.section_name: [entry]}
        if getattr(section, "needs_document", False):
            problems = section.validate([entry], document=document)
        else:
            problems = section.validate([entry])
        if problems:
            raise Problem(422, problems_detail(problems, label), errors=config_problems(problems, label=label))
        section.apply([entry], prune=False)
        saved = manager.get(**{kind.key: key})
        AuditEntry.record(
            actor=actor,
            action=AuditAction.CREATE if obj is None else AuditAction.UPDATE,
            obj=saved,
            object_repr=str(saved),
            before=before,
            after=config_snapshot(saved),
            request=request,
        )
    return saved


def problems_detail(problems: list[str], label: str) -> str:
    first = config_problems(problems[:1], label=label)[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return (f"{first[0]}: {first[1]}" if first[0] else first[1]) + more


def _document_field(problem: str) -> str:
    """`destinations[2] ('ris'): field 'port': ...` -> `destinations[2].port`."""
    match = re.match(r"^(\w+(?:\[\d+\])?)(?: \(.*?\))?: (?:field '([^']+)')?", problem)
    if not match:
        return ""
    return match[1] + (f".{match[2]}" if match[2] else "")
