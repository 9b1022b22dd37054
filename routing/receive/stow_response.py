"""The STOW-RS response body (PS3.18 10.5.3): DICOM JSON by default, DICOM XML on request.

Referenced SOP Sequence (0008,1199) lists what was stored, Failed SOP Sequence (0008,1198)
what was not, each with its Failure Reason (0008,1197) as a DIMSE status code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from xml.sax.saxutils import escape

from django.http import HttpResponse

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_CLASS_UID = "00081150"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
KEYWORDS = {
    REFERENCED_SOP_SEQUENCE: "ReferencedSOPSequence",
    FAILED_SOP_SEQUENCE: "FailedSOPSequence",
    REFERENCED_SOP_CLASS_UID: "ReferencedSOPClassUID",
    REFERENCED_SOP_INSTANCE_UID: "ReferencedSOPInstanceUID",
    FAILURE_REASON: "FailureReason",
}
XML_NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"


@dataclass(frozen=True)
class StowItem:
    status: int
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 0x0000


def stow_response(items: list[StowItem], *, accept: str = "") -> HttpResponse:
    stored = [i for i in items if i.ok]
    failed = [i for i in items if not i.ok]
    status = 200 if not failed else (202 if stored else 409)
    body: dict[str, dict] = {}
    if stored:
        body[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [_item(i) for i in stored]}
    if failed:
        body[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [_item(i, failure=True) for i in failed]}
    if _wants_xml(accept):
        return HttpResponse(_xml(body), status=status, content_type="application/dicom+xml")
    return HttpResponse(json.dumps(body), status=status, content_type="application/dicom+json")


def _item(item: StowItem, *, failure: bool = False) -> dict:
    attributes: dict[str, dict] = {}
    # A part we could not read has no UIDs to report; an empty element is not allowed in DICOM JSON.
    if item.sop_class_uid:
        attributes[REFERENCED_SOP_CLASS_UID] = {"vr": "UI", "Value": [item.sop_class_uid]}
    if item.sop_instance_uid:
        attributes[REFERENCED_SOP_INSTANCE_UID] = {"vr": "UI", "Value": [item.sop_instance_uid]}
    if failure:
        attributes[FAILURE_REASON] = {"vr": "US", "Value": [item.status]}
    return attributes


def _wants_xml(accept: str) -> bool:
    accept = accept.lower()
    return "application/dicom+xml" in accept and "application/dicom+json" not in accept


def _xml(body: dict) -> str:
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', f'<NativeDicomModel xmlns="{XML_NAMESPACE}">']
    lines += _xml_attributes(body, "  ")
    lines.append("</NativeDicomModel>")
    return "\n".join(lines) + "\n"


def _xml_attributes(attributes: dict, indent: str) -> list[str]:
    lines = []
    for tag, element in attributes.items():
        lines.append(f'{indent}<DicomAttribute tag="{tag}" vr="{element["vr"]}" keyword="{KEYWORDS[tag]}">')
        for number, value in enumerate(element["Value"], start=1):
            if element["vr"] == "SQ":
                lines.append(f'{indent}  <Item number="{number}">')
                lines += _xml_attributes(value, indent + "    ")
                lines.append(f"{indent}  </Item>")
            else:
                lines.append(f'{indent}  <Value number="{number}">{escape(str(value))}</Value>')
        lines.append(f"{indent}</DicomAttribute>")
    return lines
