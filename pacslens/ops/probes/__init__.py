"""Network probes, the one home for them: each asks a peer one question, never stores anything in
it, and answers a ProbeResult.

The endpoint Test buttons of the staff pages use `probe_dicom_echo`, `probe_http`, `probe_tcp`
and `probe_destination`; `manage.py assess` and its page use the integration set (C-ECHO,
C-FIND, C-MOVE, C-GET, storage negotiation, QIDO-RS, WADO-RS, STOW-RS, FHIR metadata, MLLP).
DIMSE probes live in `dimse`, HTTP and MLLP ones in `web`; import them from here.
"""

from __future__ import annotations

from pacslens.ops.probes.dimse import (
    DimseTarget,
    probe_dicom_echo,
    probe_echo,
    probe_find,
    probe_get,
    probe_move,
    probe_storage,
)
from pacslens.ops.probes.result import DEFAULT_TIMEOUT, ProbeResult
from pacslens.ops.probes.web import (
    probe_destination,
    probe_fhir,
    probe_http,
    probe_mllp,
    probe_qido,
    probe_stow,
    probe_tcp,
    probe_wado,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "DimseTarget",
    "ProbeResult",
    "probe_destination",
    "probe_dicom_echo",
    "probe_echo",
    "probe_fhir",
    "probe_find",
    "probe_get",
    "probe_http",
    "probe_mllp",
    "probe_move",
    "probe_qido",
    "probe_storage",
    "probe_stow",
    "probe_tcp",
    "probe_wado",
]
