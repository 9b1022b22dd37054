"""HL7 v2 messages and the MLLP client, against a real MLLP listener on a socket."""

from __future__ import annotations

from typing import Any

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from results.deliver.hl7 import (
    AckPolicy,
    HL7BuildError,
    HL7Settings,
    build_hl7_message,
    send_mllp,
)
from results.deliver.payload import OutcomeKind, Priority, Protocol, ResultPayload
from tests.support.identities import identity, result_payload
from tests.support.mllp import MLLPListener
from tests.support.net import free_port

VERSIONS = ("2.3", "2.4", "2.5", "2.5.1")
MESSAGE_TYPES = ("ORU^R01", "ORM^O01")


def make_payload(**overrides: Any) -> ResultPayload:
    defaults = {"study_instance_uid": "1.2.826.0.1.3680043.8.498.1", "accession_number": "ACC0042"}
    return result_payload(**{**defaults, "identity": identity("result-42"), **overrides})


def fields(er7: str, segment: str, occurrence: int = 0) -> list[str]:
    """Fields of a segment by HL7 number: fields(...)[n] is SEG-n (MSH-1 is the separator)."""
    found = [line for line in er7.split("\r") if line.startswith(segment + "|")]
    parts = found[occurrence].split("|")
    return ["MSH", "|", *parts[1:]] if segment == "MSH" else parts


# --- Building ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("message_type", MESSAGE_TYPES)
def test_it_builds_a_strictly_valid_message(version, message_type):
    er7 = build_hl7_message(
        make_payload(),
        message_type=message_type,
        control_id="PL000042",
        settings=HL7Settings(version=version, receiving_application="RIS"),
    )
    parsed = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert parsed.version == version
    msh = fields(er7, "MSH")
    assert msh[9].startswith(message_type)
    assert (msh[10], msh[12]) == ("PL000042", version)
    assert fields(er7, "PID")[3] == "PID-77"
    assert fields(er7, "PID")[5] == "Doe^Jane"
    assert fields(er7, "OBR")[18] == "ACC0042"


@pytest.mark.parametrize("version", VERSIONS)
def test_the_result_carries_score_flag_and_status(version):
    er7 = build_hl7_message(
        make_payload(), message_type="ORU^R01", control_id="C1", settings=HL7Settings(version=version)
    )
    score, flag = fields(er7, "OBX", 0), fields(er7, "OBX", 1)
    assert (score[2], score[5], score[11]) == ("NM", "0.8731", "P")
    assert score[3] == "PL0001^AI triage score^99PACSLENS"
    assert flag[2] == ("CWE" if version >= "2.5" else "CE")
    assert (flag[5], flag[11]) == ("Y^Yes^HL70136", "P")
    assert "demo-ich 1.2.0" in fields(er7, "NTE")[3]
    if version >= "2.5":
        assert fields(er7, "TQ1")[9] == "S^Stat^HL70485"
    else:
        assert fields(er7, "OBR")[27] == "^^^^^S"


def test_a_final_negative_routine_result():
    er7 = build_hl7_message(
        make_payload(finding_flag=False, is_final=True, priority=Priority.ROUTINE),
        message_type="ORU^R01",
        control_id="C1",
        settings=HL7Settings(version="2.5.1"),
    )
    assert fields(er7, "OBX", 1)[5] == "N^No^HL70136"
    assert fields(er7, "OBX", 0)[11] == fields(er7, "OBX", 1)[11] == "F"
    assert fields(er7, "OBR")[25] == "F"
    assert fields(er7, "TQ1")[9] == "R^Routine^HL70485"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("order_control", ["XO", "SC"])
def test_the_order_message_raises_priority(version, order_control):
    er7 = build_hl7_message(
        make_payload(),
        message_type="ORM^O01",
        control_id="C1",
        settings=HL7Settings(version=version, order_control=order_control),
    )
    orc = fields(er7, "ORC")
    assert orc[1] == order_control
    assert orc[7] == "^^^^^S"
    assert fields(er7, "OBR")[27] == "^^^^^S"


@pytest.mark.parametrize(
    ("mapping", "segment", "number"),
    [
        ("OBR-18", "OBR", 18),
        ("OBR-3", "OBR", 3),
        ("OBR-2", "OBR", 2),
        ("ORC-3", "ORC", 3),
        ("ORC-2", "ORC", 2),
    ],
)
@pytest.mark.parametrize("message_type", MESSAGE_TYPES)
def test_the_accession_field_is_configurable(mapping, segment, number, message_type):
    er7 = build_hl7_message(
        make_payload(), message_type=message_type, control_id="C1", settings=HL7Settings(accession_field=mapping)
    )
    assert fields(er7, segment)[number] == "ACC0042"
    if mapping != "OBR-18":
        assert len(fields(er7, "OBR")) <= 18 or fields(er7, "OBR")[18] == ""


def test_delimiters_in_patient_data_are_escaped():
    er7 = build_hl7_message(
        make_payload(accession_number="A|1&2", patient_id="P~9"), message_type="ORU^R01", control_id="C1"
    )
    assert fields(er7, "OBR")[18] == "A\\F\\1\\T\\2"
    assert fields(er7, "PID")[3] == "P\\R\\9"


def test_non_ascii_names_declare_utf8():
    er7 = build_hl7_message(make_payload(patient_name="Müller^Zoë"), message_type="ORU^R01", control_id="C1")
    assert fields(er7, "MSH")[18] == "UNICODE UTF-8"
    assert fields(er7, "PID")[5] == "Müller^Zoë"


def test_a_re_send_is_the_same_message():
    first = build_hl7_message(make_payload(), message_type="ORU^R01", control_id="PL000042")
    again = build_hl7_message(make_payload(), message_type="ORU^R01", control_id="PL000042")
    assert first == again


def test_an_invalid_message_fails_without_patient_data():
    payload = make_payload(patient_id="SECRET" * 60)  # longer than PID-3 allows
    with pytest.raises(HL7BuildError) as excinfo:
        build_hl7_message(payload, message_type="ORU^R01", control_id="C1")
    assert "SECRET" not in str(excinfo.value)
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__


def test_settings_refuse_unknown_versions_and_mappings():
    with pytest.raises(ValueError):
        HL7Settings(version="2.7")
    with pytest.raises(ValueError):
        HL7Settings(accession_field="IPC-1")


# --- MLLP ---------------------------------------------------------------------------------------


@pytest.fixture
def listener(mllp: MLLPListener) -> MLLPListener:
    return mllp


def deliver(
    listener: MLLPListener,
    mode: str,
    *,
    policy: AckPolicy | None = None,
    control_id: str = "PL000042",
    version: str = "2.5.1",
    ack_timeout: float = 5,
):
    listener.mode = mode
    message = build_hl7_message(
        make_payload(), message_type="ORU^R01", control_id=control_id, settings=HL7Settings(version=version)
    )
    return send_mllp(
        "127.0.0.1",
        listener.port,
        message,
        control_id=control_id,
        policy=policy or AckPolicy(),
        ack_timeout=ack_timeout,
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_aa_is_success(listener, version):
    outcome = deliver(listener, "AA", version=version)
    assert outcome.kind is OutcomeKind.SUCCESS
    assert (outcome.protocol, outcome.code, outcome.key) == (Protocol.HL7, "AA", "PL000042")
    assert listener.received == ["PL000042"]


def test_ca_is_success(listener):
    assert deliver(listener, "CA").ok


@pytest.mark.parametrize(
    ("mode", "policy", "kind"),
    [
        ("AE", AckPolicy(), OutcomeKind.PERMANENT),
        ("CE", AckPolicy(), OutcomeKind.PERMANENT),
        ("AE", AckPolicy(on_error=OutcomeKind.TRANSIENT), OutcomeKind.TRANSIENT),
        ("AR", AckPolicy(), OutcomeKind.TRANSIENT),
        ("CR", AckPolicy(), OutcomeKind.TRANSIENT),
        ("AR", AckPolicy(on_reject=OutcomeKind.PERMANENT), OutcomeKind.PERMANENT),
    ],
)
def test_errors_and_rejects_follow_the_destination_policy(listener, mode, policy, kind):
    outcome = deliver(listener, mode, policy=policy)
    assert (outcome.kind, outcome.code) == (kind, mode)
    assert "207" in outcome.message, "the ERR code is kept for support"
    assert "Doe" not in outcome.describe(), "the ACK's free text is not"


def test_an_ack_for_another_message_counts_as_no_ack(listener):
    outcome = deliver(listener, "wrong-id")
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert listener.received == ["PL000042"]


def test_no_ack_in_time_is_transient(listener):
    outcome = deliver(listener, "silent", ack_timeout=1)
    assert (outcome.kind, outcome.code) == (OutcomeKind.TRANSIENT, None)


def test_a_hang_up_is_transient(listener):
    outcome = deliver(listener, "close")
    assert (outcome.kind, outcome.code) == (OutcomeKind.TRANSIENT, None)


def test_a_listener_that_is_down_is_transient():
    message = build_hl7_message(make_payload(), message_type="ORU^R01", control_id="C1")
    outcome = send_mllp("127.0.0.1", free_port(), message, control_id="C1")
    assert outcome.kind is OutcomeKind.TRANSIENT


def test_a_re_send_reuses_the_control_id(listener):
    deliver(listener, "silent", ack_timeout=1)
    listener.release.set()
    outcome = deliver(listener, "AA")
    assert outcome.ok
    assert listener.received == ["PL000042", "PL000042"], "the RIS can spot the duplicate"


def test_destinations_offer_exactly_the_accession_fields_the_builder_knows():
    from results.deliver.hl7 import ACCESSION_FIELDS as BUILDER_FIELDS
    from results.models.delivery import ACCESSION_FIELDS as DESTINATION_FIELDS

    assert set(DESTINATION_FIELDS) == set(BUILDER_FIELDS)
