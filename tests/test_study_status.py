from __future__ import annotations

import json

import pytest
from django.core.management import CommandError, call_command

from tests.support.ct import make_ct
from tests.support.factories import receive

pytestmark = pytest.mark.django_db


def test_it_prints_state_counts_and_timeline(data_dir, capsys):
    ds = make_ct()
    receive(data_dir, ds)
    receive(data_dir, make_ct(study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID))
    call_command("study_status", ds.StudyInstanceUID)
    out = capsys.readouterr().out
    assert "State      receiving" in out
    assert "1 series, 2 instances" in out
    assert "receiving" in out.split("Timeline")[1]
    assert "ZZTEST" not in out and "ZZ0001" not in out  # no patient data in support output


def test_json_is_stable(data_dir, capsys):
    ds = make_ct()
    receive(data_dir, ds)
    call_command("study_status", ds.StudyInstanceUID, "--json")
    data = json.loads(capsys.readouterr().out)
    assert data["study_instance_uid"] == ds.StudyInstanceUID
    assert data["state"] == "receiving"
    assert data["instance_count"] == 1
    assert data["series"][0]["modality"] == "CT"
    assert data["timeline"][0]["kind"] == "receiving"
    assert data["timeline"][0]["seconds_since_previous"] is None


def test_unknown_study_is_a_clear_error():
    with pytest.raises(CommandError, match="no study with Study Instance UID 1.2.3"):
        call_command("study_status", "1.2.3")
