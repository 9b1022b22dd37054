"""STOW-RS client: POST result SRs to `{base}/studies` and read the per-instance answer.

A STOW response is about each instance, not the request: 202 means some were stored and
some were not, 409 that none were. `stow_datasets` returns one `Outcome` per dataset, in
order, from the Referenced SOP Sequence (0008,1199) and Failed SOP Sequence (0008,1198).

Plain `requests` rather than dicomweb-client: classification needs the raw HTTP status
together with the per-instance body for every answer (200/202/409 alike), which is a few
lines here; dicomweb-client is also not available from the package index this project
installs from.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import requests
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from results.deliver.payload import Outcome, OutcomeKind, Protocol

DEFAULT_TIMEOUT_S = 30.0
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"


@dataclass(frozen=True)
class HttpAuth:
    """How to authenticate to a DICOMweb (or FHIR) endpoint; secrets kept out of repr."""

    kind: Literal["none", "basic", "bearer"] = "none"
    username: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)

    def apply(self, headers: dict[str, str]) -> tuple[str, str] | None:
        """Add the Authorization header (bearer) or return requests' basic-auth tuple."""
        if self.kind == "bearer":
            headers["Authorization"] = f"Bearer {self.token}"
        elif self.kind == "basic":
            return (self.username, self.password)
        return None


NO_AUTH = HttpAuth()


def stow_datasets(
    base_url: str,
    datasets: Sequence[Dataset],
    *,
    auth: HttpAuth = NO_AUTH,
    timeout: float = DEFAULT_TIMEOUT_S,
    session: requests.Session | None = None,
    verify: bool | str = True,
) -> list[Outcome]:
    """POST `datasets` in one multipart request; one Outcome per dataset, same order."""
    if not datasets:
        return []
    keys = [str(ds.SOPInstanceUID) for ds in datasets]
    url = f"{base_url.rstrip('/')}/studies"
    boundary = f"pacslens-{uuid.uuid4().hex}"
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    basic = auth.apply(headers)
    body = _multipart(boundary, [_part10(ds) for ds in datasets])
    http = session or requests.Session()
    try:
        response = http.post(url, data=body, headers=headers, auth=basic, timeout=timeout, verify=verify)
    except requests.exceptions.SSLError as exc:
        return _all(keys, OutcomeKind.CONFIG_ERROR, None, f"TLS error talking to {url}: {exc}")
    except requests.exceptions.RequestException as exc:
        # Refused, reset, DNS, timeouts: the server may come back. A re-send is harmless
        # because SOP Instance UIDs are deterministic.
        return _all(keys, OutcomeKind.TRANSIENT, None, f"STOW-RS to {url} failed: {type(exc).__name__}")
    finally:
        if session is None:
            http.close()
    return classify_stow_response(url, response.status_code, _json_or_none(response), keys)


def classify_stow_response(url: str, status: int, body: Any, keys: Sequence[str]) -> list[Outcome]:
    """Outcomes per instance from the HTTP status and the DICOM JSON body (if any)."""
    if status in (401, 403):
        return _all(
            keys,
            OutcomeKind.CONFIG_ERROR,
            status,
            f"{url} refused our credentials; fix the destination's authentication",
        )
    if status in (404, 405, 415):
        # The URL is not a STOW-RS endpoint or does not take application/dicom: no object
        # will ever get through until the destination is configured properly.
        return _all(
            keys, OutcomeKind.CONFIG_ERROR, status, f"{url} is not a STOW-RS endpoint accepting application/dicom"
        )
    if status in (408, 429) or status >= 500:
        return _all(keys, OutcomeKind.TRANSIENT, status, f"{url} is unavailable")
    if status not in (200, 202, 409):
        # 400 and other client errors: the request as built is unacceptable.
        return _all(keys, OutcomeKind.PERMANENT, status, f"{url} rejected the request")
    stored, failed = _instance_results(body)
    outcomes = []
    for key in keys:
        if key in stored:
            warning = stored[key]
            outcomes.append(
                Outcome(
                    kind=OutcomeKind.SUCCESS,
                    protocol=Protocol.DICOMWEB,
                    code=status,
                    message=f"stored at {url}",
                    key=key,
                    warning=f"warning reason 0x{warning:04X}" if warning is not None else "",
                )
            )
        elif key in failed:
            outcomes.append(_failed_instance(url, status, key, failed[key]))
        elif status == 200:
            # 200 means every instance was stored, even if the body does not list them.
            outcomes.append(
                Outcome(
                    kind=OutcomeKind.SUCCESS,
                    protocol=Protocol.DICOMWEB,
                    code=status,
                    message=f"stored at {url}",
                    key=key,
                )
            )
        else:
            outcomes.append(
                Outcome(
                    kind=OutcomeKind.TRANSIENT if status == 202 else OutcomeKind.PERMANENT,
                    protocol=Protocol.DICOMWEB,
                    code=status,
                    key=key,
                    message=f"{url} answered {status} without a result for this instance",
                )
            )
    return outcomes


def _failed_instance(url: str, status: int, key: str, reason: int | None) -> Outcome:
    text = f"{url} did not store the instance"
    if reason is None:
        kind, detail = OutcomeKind.PERMANENT, "no failure reason given"
    elif 0xA700 <= reason <= 0xA7FF:
        kind, detail = OutcomeKind.TRANSIENT, "out of resources"
    elif reason == 0x0110:
        kind, detail = OutcomeKind.TRANSIENT, "processing failure"
    elif 0xA900 <= reason <= 0xA9FF:
        kind, detail = OutcomeKind.PERMANENT, "dataset does not match SOP class"
    elif reason == 0xC122:
        kind, detail = OutcomeKind.PERMANENT, "transfer syntax not supported"
    elif 0xC000 <= reason <= 0xCFFF:
        kind, detail = OutcomeKind.PERMANENT, "cannot understand"
    else:
        kind, detail = OutcomeKind.PERMANENT, "failure"
    reason_text = f"failure reason 0x{reason:04X}: " if reason is not None else ""
    return Outcome(
        kind=kind, protocol=Protocol.DICOMWEB, code=status, key=key, message=f"{text} ({reason_text}{detail})"
    )


def _instance_results(body: Any) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """({stored uid: warning reason}, {failed uid: failure reason}) from a DICOM JSON body."""
    if isinstance(body, list) and body:
        body = body[0]  # some servers wrap the single response dataset in a list
    if not isinstance(body, dict):
        return {}, {}
    stored = {uid: _us(item, WARNING_REASON) for uid, item in _items(body, REFERENCED_SOP_SEQUENCE)}
    failed = {uid: _us(item, FAILURE_REASON) for uid, item in _items(body, FAILED_SOP_SEQUENCE)}
    return stored, failed


def _items(body: dict[str, Any], tag: str) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for item in (body.get(tag) or {}).get("Value", []) or []:
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if isinstance(uid, str):
            found.append((uid, item))
    return found


def _us(item: dict[str, Any], tag: str) -> int | None:
    value = _first(item, tag)
    return int(value) if isinstance(value, (int, float, str)) and str(value).isdigit() else None


def _first(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _json_or_none(response: requests.Response) -> Any:
    if "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _multipart(boundary: str, parts: Sequence[bytes]) -> bytes:
    chunks: list[bytes] = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)


def _part10(ds: Dataset) -> bytes:
    # Not results.deliver.sr.sr_to_bytes: that would make this client import highdicom.
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _all(keys: Sequence[str], kind: OutcomeKind, code: int | None, message: str) -> list[Outcome]:
    return [Outcome(kind=kind, protocol=Protocol.DICOMWEB, code=code, message=message, key=key) for key in keys]
