"""The Test buttons and the integration assessment, as one function each for the staff pages and
the automation API: what is probed, what is refused before probing, what is kept (a destination's
last test) and the audit row are the same whichever asked.

Each test answers `(result, problem)`: the probe's ProbeResult, or (result None) why nothing was
probed, in words the user can act on ("This AE title has no host and port: ...").
"""

from __future__ import annotations

from pacslens.ops.assess import node_assess
from pacslens.ops.probes import ProbeResult, probe_destination, probe_dicom_echo, probe_http
from results.models import Destination
from results.models.sealed import SECRET_UNREADABLE
from routing.models import ApplicationEntity, AuditAction, AuditEntry, PollSource
from routing.pull.dicomweb import dicomweb_session
from routing.pull.types import PullError

# Per probe: an assessment runs about ten probes in the request, so keep each short enough that
# a node that drops packets still answers within the web server's timeout.
ASSESS_PROBE_TIMEOUT = 2.0

ProbeAnswer = tuple[ProbeResult | None, str]


def _audit(obj, result: ProbeResult | None, problem: str, *, actor: str, request) -> None:
    AuditEntry.record(
        actor=actor,
        action=AuditAction.TEST,
        obj=obj,
        object_repr=str(obj),
        detail=result.audit_text() if result else problem,
        request=request,
    )


def ae_test(entity: ApplicationEntity, *, actor: str, request=None) -> ProbeAnswer:
    """C-ECHO the node from our AE title."""
    if entity.missing_address or entity.port is None:
        result = None
        problem = f"This AE title has no {entity.missing_address}: edit it to add one, then test again."
    else:
        result = probe_dicom_echo(host=entity.host, port=entity.port, called_ae_title=entity.ae_title, tls=entity.tls)
        problem = ""
    _audit(entity, result, problem, actor=actor, request=request)
    return result, problem


def destination_test(destination: Destination, *, actor: str, request=None) -> ProbeAnswer:
    """The destination's probe with its own credentials (an OAuth token fetched first); the
    outcome is kept as its last test (the dashboard's Health panel)."""
    problem, result = "", None
    try:
        destination.full_clean()
    except Exception as exc:  # ValidationError: the destination is not complete enough to test
        problem = f"Fix the configuration first: {'; '.join(getattr(exc, 'messages', [str(exc)]))}"
    if not problem and destination.auth != "none" and destination.secret_unreadable:
        problem = f"Configuration error: {SECRET_UNREADABLE}."
    if not problem:
        result = probe_destination(destination)
    destination.test_record(ok=bool(result and result.ok), detail=result.in_words() if result else problem)
    _audit(destination, result, problem, actor=actor, request=request)
    return result, problem


def poll_source_test(source: PollSource, *, actor: str, request=None) -> ProbeAnswer:
    """C-ECHO the PACS of a DIMSE source, or a QIDO-RS request to a DICOMweb one."""
    problem, result = "", None
    if source.kind == PollSource.Kind.DIMSE:
        pacs = source.pacs
        if pacs is None:
            problem = "The source has no PACS: choose its AE title."
        elif pacs.missing_address or pacs.port is None:
            problem = f"The source's PACS ({pacs.ae_title}) has no {pacs.missing_address}: edit its AE title."
        else:
            result = probe_dicom_echo(host=pacs.host, port=pacs.port, called_ae_title=pacs.ae_title, tls=pacs.tls)
    else:
        try:
            session = dicomweb_session(source)
        except PullError as exc:
            problem = f"The source's configuration is refused: {exc}."
        else:
            with session:
                result = probe_http(url=source.dicomweb_url, kind="dicomweb", session=session)
    _audit(source, result, problem, actor=actor, request=request)
    return result, problem


def ae_assess(entity: ApplicationEntity, *, actor: str, request=None):
    """The integration assessment of `manage.py assess` (nothing is stored in the node), or None
    when the node has no address to assess."""
    if entity.missing_address:
        return None
    report = node_assess(node=entity.ae_title, timeout=ASSESS_PROBE_TIMEOUT)
    AuditEntry.record(
        actor=actor,
        action=AuditAction.TEST,
        obj=entity,
        object_repr=str(entity),
        detail="integration assessment",
        request=request,
    )
    return report
