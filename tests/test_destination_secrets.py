"""Destination secrets: encrypted at rest with a key kept outside the database, and never
carried to a new target: change the URL, host or auth and the secret must be given again."""

from __future__ import annotations

import stat

import pytest
from cryptography.fernet import Fernet
from django.db import connection

from pacslens.site_config.document import ConfigError, config_import
from results.deliver.payload import OutcomeKind
from results.deliver.senders import send
from results.models import Destination
from results.models.sealed import _fernet

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("plain_static_storage")]
HX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture(autouse=True)
def keys(settings, data_dir):
    settings.SECRETS_KEYS = []
    _fernet.cache_clear()
    yield settings
    _fernet.cache_clear()


def _stored(destination: Destination) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT secret FROM results_destination WHERE id = %s", [destination.pk])
        return cursor.fetchone()[0]


def _form(base_url: str, **fields: str) -> dict:
    return {
        "name": "web",
        "kind": "dicomweb",
        "base_url": base_url,
        "auth": "bearer",
        "enabled": "on",
        "timeout_seconds": "10",
        "max_attempts": "8",
        "backoff_base_seconds": "10",
        "backoff_cap_seconds": "1800",
        "breaker_threshold": "5",
        "breaker_cooldown_seconds": "60",
        "on_ack_error": "fail",
        "on_ack_reject": "retry",
        "hl7_version": "2.5.1",
        "sending_application": "PACSLENS",
        "accession_field": "OBR-18",
        **fields,
    }


class TestTargetChange:
    def test_a_new_url_needs_the_secret_again_inline(self, admin, recorder):
        destination = Destination.objects.create(
            name="web", kind="dicomweb", base_url="https://pacs.example/dicom-web", auth="bearer", secret="old-token"
        )
        page = admin.post(f"/endpoints/destinations/{destination.pk}/", _form(recorder.url), **HX).content.decode()
        assert 'id="id_secret-errors"' in page and "enter the password or token again" in page
        destination.refresh_from_db()
        assert destination.base_url == "https://pacs.example/dicom-web" and destination.secret == "old-token"
        admin.post(f"/endpoints/destinations/{destination.pk}/test/", **HX)
        assert recorder.headers == []  # the probe went to the old, unreachable URL, not here

    def test_with_the_secret_given_again_it_saves_and_tests(self, admin, recorder):
        destination = Destination.objects.create(
            name="web", kind="dicomweb", base_url="https://pacs.example/dicom-web", auth="bearer", secret="old-token"
        )
        response = admin.post(
            f"/endpoints/destinations/{destination.pk}/", _form(recorder.url, secret="new-token"), **HX
        )
        assert response["HX-Redirect"] == "/endpoints/"
        admin.post(f"/endpoints/destinations/{destination.pk}/test/", **HX)
        assert recorder.authorizations() == ["Bearer new-token"]

    def test_switching_auth_off_drops_the_secret(self, admin):
        destination = Destination.objects.create(
            name="web", kind="dicomweb", base_url="https://pacs.example/dicom-web", auth="bearer", secret="old-token"
        )
        admin.post(f"/endpoints/destinations/{destination.pk}/", _form(destination.base_url, auth="none"), **HX)
        destination.refresh_from_db()
        assert (destination.auth, destination.secret) == ("none", "")

    def test_an_unchanged_target_keeps_the_secret(self, admin):
        destination = Destination.objects.create(
            name="web", kind="dicomweb", base_url="https://pacs.example/dicom-web", auth="bearer", secret="old-token"
        )
        form = _form(destination.base_url, description="renamed")
        assert admin.post(f"/endpoints/destinations/{destination.pk}/", form, **HX)["HX-Redirect"] == "/endpoints/"
        destination.refresh_from_db()
        assert destination.secret == "old-token"

    def test_a_yaml_import_moving_the_target_must_give_the_secret(self):
        Destination.objects.create(
            name="fhir", kind="fhir", base_url="https://ris.example/fhir", auth="bearer", secret="old-token"
        )
        with pytest.raises(ConfigError, match="stored secret is not kept"):
            config_import(
                "destinations:\n- {name: fhir, kind: fhir, base_url: 'https://evil.example/fhir', auth: bearer}\n"
            )
        assert Destination.objects.get().secret == "old-token"


class TestEncryptionAtRest:
    def test_the_database_holds_ciphertext_and_the_key_file_is_private(self, keys):
        destination = Destination.objects.create(
            name="web", kind="dicomweb", base_url="https://pacs.example/dicom-web", auth="bearer", secret="s3cr3t"
        )
        stored = _stored(destination)
        assert stored and "s3cr3t" not in stored
        key_file = keys.DATA_DIR / "secrets.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert Fernet(key_file.read_text().strip()).decrypt(stored.encode()) == b"s3cr3t"
        assert Destination.objects.get().secret == "s3cr3t"

    def test_keys_rotate_newest_first(self, keys):
        old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
        keys.SECRETS_KEYS = [old]
        destination = Destination.objects.create(
            name="web", kind="fhir", base_url="https://r/f", auth="bearer", secret="t"
        )
        keys.SECRETS_KEYS = [new, old]
        _fernet.cache_clear()
        destination = Destination.objects.get()
        assert destination.secret == "t"
        destination.save()  # re-encrypted with the newest key
        assert Fernet(new).decrypt(_stored(destination).encode()) == b"t"

    def test_an_undecryptable_secret_is_a_configuration_error_not_a_crash(self, admin, keys, recorder):
        keys.SECRETS_KEYS = [Fernet.generate_key().decode()]
        destination = Destination.objects.create(
            name="web", kind="dicomweb", base_url=recorder.url, auth="bearer", secret="lost"
        )
        keys.SECRETS_KEYS = [Fernet.generate_key().decode()]  # the key was lost
        _fernet.cache_clear()
        assert admin.get("/endpoints/").status_code == 200
        page = admin.post(f"/endpoints/destinations/{destination.pk}/test/", **HX).content.decode()
        assert "Configuration error" in page and "cannot be decrypted" in page
        assert recorder.headers == []
        ciphertext = _stored(destination)
        admin.post(f"/endpoints/destinations/{destination.pk}/", _form(recorder.url, description="x"), **HX)
        assert _stored(destination) == ciphertext  # kept for when the key comes back

    def test_a_delivery_with_an_undecryptable_secret_fails_as_configuration(self, keys):
        keys.SECRETS_KEYS = [Fernet.generate_key().decode()]
        Destination.objects.create(
            name="ris", kind="fhir", base_url="https://ris.example/fhir", auth="bearer", secret="t"
        )
        keys.SECRETS_KEYS = [Fernet.generate_key().decode()]
        _fernet.cache_clear()
        outcome = send(
            destination=Destination.objects.get(), payload=None, key=("urn:ietf:rfc:3986", "k"), context=None
        )
        assert outcome.kind == OutcomeKind.CONFIG_ERROR and "cannot be decrypted" in outcome.message


class TestRotateCommand:
    def test_it_re_encrypts_every_secret_so_the_old_key_can_go(self, keys):
        from django.core.management import call_command

        old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
        keys.SECRETS_KEYS = [old]
        for name in ("a", "b"):
            Destination.objects.create(
                name=name, kind="fhir", base_url="https://r/f", auth="bearer", secret=f"t-{name}"
            )
        keys.SECRETS_KEYS = [new, old]
        _fernet.cache_clear()
        call_command("secrets_rotate")
        keys.SECRETS_KEYS = [new]
        _fernet.cache_clear()
        assert sorted(Destination.objects.values_list("secret", flat=True)) == ["t-a", "t-b"]

    def test_it_names_what_no_key_decrypts(self, keys, capsys):
        from django.core.management import call_command

        keys.SECRETS_KEYS = [Fernet.generate_key().decode()]
        Destination.objects.create(name="lost", kind="fhir", base_url="https://r/f", auth="bearer", secret="t")
        keys.SECRETS_KEYS = [Fernet.generate_key().decode()]
        _fernet.cache_clear()
        call_command("secrets_rotate")
        out = capsys.readouterr().out
        assert "0 secret(s) re-encrypted" in out and "lost" in out
