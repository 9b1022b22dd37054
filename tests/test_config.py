"""export_config / import_config: round trip, all-or-nothing validation with named errors."""

from __future__ import annotations

import pytest
import yaml
from django.core.management import CommandError, call_command

from pacslens.site_config.document import config_export, config_import
from routing.models import ApplicationEntity

pytestmark = pytest.mark.django_db


def make_aes():
    ApplicationEntity.objects.create(
        ae_title="CT01", host="10.0.0.5", port=104, description="Head CT", quiet_period_seconds=20
    )
    ApplicationEntity.objects.create(
        ae_title="PACS", host="pacs.local", port=11112, may_query=True, receives_results=True, tls=True
    )


class TestExportImport:
    def test_round_trip_is_exact(self, tmp_path):
        make_aes()
        first = config_export()
        path = tmp_path / "site.yaml"
        call_command("export_config", str(path))
        assert path.read_text() == first
        ApplicationEntity.objects.all().delete()
        call_command("import_config", str(path))
        assert config_export() == first

    def test_import_updates_and_creates(self):
        make_aes()
        document = yaml.safe_load(config_export())
        document["ae_titles"][0]["port"] = 4242
        document["ae_titles"].append({"ae_title": "MR01", "host": "10.0.0.9", "port": 104})
        summary = config_import(yaml.safe_dump(document))
        assert summary["ae_titles"] == {"created": 1, "updated": 2, "deleted": 0}
        assert ApplicationEntity.objects.get(ae_title="CT01").port == 4242
        assert ApplicationEntity.objects.get(ae_title="MR01").may_send  # model default

    def test_prune_removes_what_the_file_lacks(self):
        make_aes()
        config_import("pacslens_config: 1\nae_titles:\n- ae_title: CT01\n", prune=True)
        assert list(ApplicationEntity.objects.values_list("ae_title", flat=True)) == ["CT01"]


class TestValidation:
    def test_any_error_changes_nothing_and_names_entry_and_field(self, tmp_path):
        make_aes()
        before = config_export()
        document = yaml.safe_load(before)
        document["ae_titles"][0]["port"] = "lots"
        document["ae_titles"].append({"ae_title": "BAD\\AE", "host": "x"})
        document["ae_titles"].append({"ae_title": "NEWONE", "colour": "red"})
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(document))
        with pytest.raises(CommandError) as excinfo:
            call_command("import_config", str(path))
        text = str(excinfo.value)
        assert "nothing was changed" in text
        assert "ae_titles[0] ('CT01'): field 'port'" in text
        assert "ae_titles[2] ('BAD\\\\AE'): field 'ae_title': an AE title cannot contain a backslash" in text
        assert "ae_titles[3] ('NEWONE'): unknown field(s) colour" in text
        assert config_export() == before
        assert not ApplicationEntity.objects.filter(ae_title="NEWONE").exists()

    def test_duplicate_key_in_file(self):
        with pytest.raises(Exception) as excinfo:
            config_import("pacslens_config: 1\nae_titles:\n- ae_title: A\n- ae_title: A\n")
        assert "appears twice" in str(excinfo.value)

    def test_wrong_types_and_versions(self):
        for text, expected in [
            ("- just a list", "YAML mapping"),
            ("pacslens_config: 9\n", "format version"),
            ("pacslens_config: 1\nrouters: []\n", "unknown section"),
            ("pacslens_config: 1\nae_titles: {}\n", "must be a list"),
            ("pacslens_config: 1\nae_titles:\n- ae_title: X\n  port: lots\n", "field 'port'"),
            ("pacslens_config: [\n", "not valid YAML"),
        ]:
            with pytest.raises(Exception) as excinfo:
                config_import(text)
            assert expected in str(excinfo.value), text


class TestDestinations:
    def document(self):
        return {
            "pacslens_config": 1,
            "ae_titles": [{"ae_title": "PACS", "host": "pacs.local", "port": 104, "receives_results": True}],
            "routing_rules": [
                {"name": "CT head", "conditions": [{"attribute": "Modality", "operator": "equals", "value": "CT"}]}
            ],
            "destinations": [
                {"name": "main-pacs", "kind": "dicom", "application_entity": "PACS", "rules": ["CT head"]},
                {
                    "name": "ris",
                    "kind": "hl7",
                    "host": "ris.local",
                    "port": 2575,
                    "hl7_message_type": "ORM^O01",
                    "rules": ["CT head"],
                },
                {
                    "name": "fhir",
                    "kind": "fhir",
                    "base_url": "https://fhir.local/r4",
                    "auth": "bearer",
                    "secret": "s3cret-token",
                },
            ],
        }

    def test_destinations_round_trip_without_secrets(self):
        from results.models import Destination

        config_import(yaml.safe_dump(self.document()))
        exported = config_export()
        assert "s3cret-token" not in exported
        assert Destination.objects.get(name="fhir").secret == "s3cret-token"
        assert sorted(Destination.objects.get(name="ris").rules.values_list("name", flat=True)) == ["CT head"]
        config_import(exported)  # the exported file keeps the stored secret
        assert Destination.objects.get(name="fhir").secret == "s3cret-token"
        assert config_export() == exported

    def test_bad_destinations_are_named_and_change_nothing(self):
        from results.models import Destination

        document = self.document()
        document["destinations"][0]["application_entity"] = "NOSUCH"
        document["destinations"][1]["port"] = None
        document["destinations"][2]["base_url"] = "ftp://x"
        with pytest.raises(Exception) as excinfo:
            config_import(yaml.safe_dump(document))
        text = str(excinfo.value)
        assert "destinations[0] ('main-pacs'): field 'application_entity': no AE title 'NOSUCH'" in text
        assert "destinations[1] ('ris'): field 'port'" in text
        assert "destinations[2] ('fhir'): field 'base_url'" in text
        assert not Destination.objects.exists()
        assert not ApplicationEntity.objects.exists()
