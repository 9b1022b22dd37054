"""OAuth 2.0 client credentials against a real token endpoint (authlib's server side, issuing
expiring tokens) in front of the real peers: the FHIR server and Orthanc's DICOMweb. Over HTTPS
with a test hospital CA, so the per-endpoint CA bundle is in every request.
"""

from __future__ import annotations

import time

import pytest
from django.core.exceptions import ValidationError
from django.db import connection

from pacslens.ops.probes.web import probe_destination
from pacslens.site_config.destinations import DestinationsSection
from pacslens.staff.forms import DestinationForm
from results.deliver.ledger import deliveries_create, deliveries_run_pending
from results.deliver.payload import OutcomeKind
from results.deliver.senders import send
from results.models import Delivery, DeliveryAttempt, DeliveryState, Destination
from routing.models import OAuthToken, PollSource, Study
from routing.models.audit import MASK, config_snapshot
from routing.models.oauth import validate_ca_bundle
from routing.oauth import OAuthClient, access_token
from tests.support.factories import inferred_study
from tests.support.fhir_router import TOKEN as ROUTER_TOKEN
from tests.support.fhir_server import FHIRServer
from tests.support.identities import result_payload
from tests.support.oauth_server import OAuthGateway
from tests.support.pull import orthanc_study, poll_now

pytestmark = [pytest.mark.django_db, pytest.mark.interop]

CLIENT_ID, CLIENT_SECRET = "pacslens-gateway", "client-s3cret-value"


@pytest.fixture
def fhir_gateway(oauth_gateway_factory, fhir_router) -> OAuthGateway:
    """The token endpoint in front of the suite's FHIR server (Medplum's router), which takes
    its own static token from the gateway."""
    gateway = oauth_gateway_factory(
        upstream=fhir_router.url, upstream_headers={"Authorization": f"Bearer {ROUTER_TOKEN}"}, lifetime=60
    )
    gateway.register(CLIENT_ID, CLIENT_SECRET)
    return gateway


def oauth_destination(gateway: OAuthGateway, oauth_ca, rule, *, kind: str = "fhir", **overrides) -> Destination:
    values = dict(
        name=f"{kind}-cloud",
        kind=kind,
        base_url=gateway.url,
        auth="oauth2",
        oauth_token_url=gateway.token_url,
        oauth_client_id=CLIENT_ID,
        oauth_client_secret=CLIENT_SECRET,
        oauth_scope="system/Observation.write system/ImagingStudy.write",
        oauth_audience="https://fhir.hospital.example",
        ca_bundle=oauth_ca.bundle,
        timeout_seconds=10,
        backoff_base_seconds=1,
        backoff_cap_seconds=5,
    )
    values.update(overrides)
    destination = Destination(**values)
    destination.full_clean()
    destination.save()
    destination.rules.add(rule)
    return destination


def deliver_one(data_dir, rule) -> Delivery:
    study, result = inferred_study(data_dir)
    [delivery] = deliveries_create(study=study, results=[result], rule_ids=[rule.pk])
    deliveries_run_pending(only_ids=[delivery.pk])
    delivery.refresh_from_db()
    return delivery


class TestFhirThroughTheTokenEndpoint:
    def test_one_token_serves_every_delivery_and_is_kept_sealed(self, data_dir, rule, fhir_gateway, oauth_ca):
        oauth_destination(fhir_gateway, oauth_ca, rule)

        first, second = deliver_one(data_dir, rule), deliver_one(data_dir, rule)

        assert (first.state, second.state) == (DeliveryState.DELIVERED, DeliveryState.DELIVERED), second.last_error
        assert len(fhir_gateway.token_requests) == 1  # the second delivery used the cached token
        [form] = fhir_gateway.token_requests
        assert form == {
            "grant_type": "client_credentials",
            "scope": "system/Observation.write system/ImagingStudy.write",
            "audience": "https://fhir.hospital.example",
        }  # the secret went in the Basic header, not the body
        assert fhir_gateway.forwarded == 6 and fhir_gateway.refused == 0
        [row] = OAuthToken.objects.all()
        assert row.access_token in fhir_gateway.tokens
        with connection.cursor() as cursor:
            cursor.execute("SELECT access_token FROM routing_oauthtoken")
            [(stored,)] = cursor.fetchall()
        assert row.access_token not in stored and CLIENT_SECRET not in stored

    def test_another_worker_uses_the_cached_token(self, db, fhir_gateway, oauth_ca, data_dir):
        destination = Destination(
            oauth_token_url=fhir_gateway.token_url,
            oauth_client_id=CLIENT_ID,
            oauth_client_secret=CLIENT_SECRET,
            ca_bundle=oauth_ca.bundle,
        )
        token = access_token(OAuthClient.of(destination))

        # A client built afresh, as another worker process builds its own, reads the table.
        again = access_token(OAuthClient.of(Destination(**{f: getattr(destination, f) for f in HTTP_FIELDS})))

        assert again == token and len(fhir_gateway.token_requests) == 1

    def test_an_expired_token_is_replaced_before_it_is_sent(self, data_dir, rule, fhir_gateway, oauth_ca):
        fhir_gateway.lifetime = 2
        oauth_destination(fhir_gateway, oauth_ca, rule)
        assert deliver_one(data_dir, rule).state == DeliveryState.DELIVERED

        time.sleep(2.1)  # the token expires between two deliveries
        later = deliver_one(data_dir, rule)

        assert later.state == DeliveryState.DELIVERED, later.last_error
        assert len(fhir_gateway.token_requests) == 2
        assert fhir_gateway.refused == 0  # refreshed before use, not after a 401

    def test_a_token_the_server_forgot_is_refreshed_once_on_401_and_the_request_sent_again(
        self, data_dir, rule, fhir_gateway, oauth_ca, fhir_router
    ):
        oauth_destination(fhir_gateway, oauth_ca, rule)
        assert deliver_one(data_dir, rule).state == DeliveryState.DELIVERED
        fhir_gateway.forget_tokens()  # the authorization server restarted

        later = deliver_one(data_dir, rule)

        assert later.state == DeliveryState.DELIVERED, later.last_error
        assert (len(fhir_gateway.token_requests), fhir_gateway.refused) == (2, 1)
        assert later.attempts == 1  # the retry was inside the attempt
        assert len(fhir_router.search("Observation")) == 2

    def test_a_peer_that_still_answers_401_is_retried_once_only(self, data_dir, rule, oauth_gateway_factory, oauth_ca):
        # The gateway accepts our token but the FHIR server behind it (the fault-injection stub)
        # wants another: 401 each time.
        server = FHIRServer()
        try:
            gateway = oauth_gateway_factory(upstream=server.url)
            gateway.register(CLIENT_ID, CLIENT_SECRET)
            oauth_destination(gateway, oauth_ca, rule)

            delivery = deliver_one(data_dir, rule)

            assert delivery.state == DeliveryState.FAILED
            assert delivery.last_error_class == "config_error" and "401" in delivery.last_error
            assert len(gateway.token_requests) == 2 and len(server.requests) == 2
        finally:
            server.stop()

    @pytest.mark.usefixtures("plain_static_storage")
    def test_a_revoked_client_is_a_token_error_retried_then_in_the_failure_queue(
        self, data_dir, rule, fhir_gateway, oauth_ca, client, users
    ):
        oauth_destination(fhir_gateway, oauth_ca, rule, max_attempts=2)
        assert deliver_one(data_dir, rule).state == DeliveryState.DELIVERED
        fhir_gateway.revoke_client(CLIENT_ID)

        delivery = deliver_one(data_dir, rule)

        assert (delivery.state, delivery.last_error_class) == (DeliveryState.PENDING, "token_error")
        assert "refused the client: invalid_client" in delivery.last_error
        assert CLIENT_SECRET not in delivery.last_error
        attempt = DeliveryAttempt.objects.get(delivery=delivery)
        assert (attempt.outcome, attempt.code) == ("token_error", "invalid_client")
        # the cached token was refused (401), a new one was asked for and refused
        assert fhir_gateway.refused == 1 and len(fhir_gateway.token_requests) == 2

        Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=delivery.created_at)
        deliveries_run_pending(only_ids=[delivery.pk])
        delivery.refresh_from_db()
        assert (delivery.state, delivery.last_error_class) == (DeliveryState.FAILED, "token_error")
        client.force_login(users["informaticist"])
        page = client.get("/failures/?error_class=token_error").content.decode()
        assert "Token error (OAuth)" in page and "invalid_client" in page


class TestCABundle:
    def test_without_the_hospital_ca_the_token_endpoint_is_not_trusted(self, db, rule, fhir_gateway, oauth_ca):
        for bundle in ("", oauth_ca.other.cert.read_text()):  # the system's CAs, another CA
            destination = oauth_destination(fhir_gateway, oauth_ca, rule, ca_bundle=bundle, name=f"x{len(bundle)}")
            outcome = send(
                destination=destination, payload=result_payload(), key=("urn:ietf:rfc:3986", "urn:uuid:1"), context=None
            )
            assert outcome.kind is OutcomeKind.TOKEN_ERROR
            assert "TLS certificate not trusted (check the CA bundle)" in outcome.message
        assert fhir_gateway.token_requests == []

    def test_a_bundle_is_validated_when_saved(self, oauth_ca):
        validate_ca_bundle(oauth_ca.bundle + oauth_ca.other.cert.read_text())  # several CAs are fine
        for bad, says in (
            ("not a certificate", "not a PEM certificate bundle"),
            (oauth_ca.bundle.replace("A", "B", 40), "not a PEM certificate bundle"),
            (oauth_ca.bundle + oauth_ca.ca.key.read_text(), "private key"),
        ):
            with pytest.raises(ValidationError, match=says):
                validate_ca_bundle(bad)
        destination = Destination(name="x", kind="fhir", base_url="https://f/", ca_bundle="junk")
        with pytest.raises(ValidationError) as raised:
            destination.full_clean()
        assert "ca_bundle" in raised.value.message_dict


class TestConfiguration:
    def test_oauth_needs_its_token_url_client_and_secret(self, db):
        destination = Destination(name="x", kind="fhir", base_url="https://fhir.example/", auth="oauth2")
        with pytest.raises(ValidationError) as raised:
            destination.full_clean()
        assert {"oauth_token_url", "oauth_client_id", "oauth_client_secret"} <= set(raised.value.message_dict)

    def test_a_poll_source_takes_oauth_or_a_token_variable_not_both(self, db):
        source = PollSource(
            name="vna",
            kind="dicomweb",
            dicomweb_url="https://vna.example/dicom-web",
            dicomweb_token_env="PACSLENS_POLL_TOKEN_VNA",
            oauth_token_url="https://idp.example/token",
            oauth_client_id="c",
            oauth_client_secret="s",
        )
        with pytest.raises(ValidationError) as raised:
            source.full_clean()
        assert "dicomweb_token_env" in raised.value.message_dict


class TestDicomweb:
    @pytest.fixture
    def orthanc_gateway(self, oauth_gateway_factory, orthanc) -> OAuthGateway:
        gateway = oauth_gateway_factory(upstream=orthanc.dicomweb_url, lifetime=60)
        gateway.register(CLIENT_ID, CLIENT_SECRET)
        return gateway

    def test_stow_rs_of_the_sr_through_the_token_endpoint(self, data_dir, rule, orthanc, orthanc_gateway, oauth_ca):
        orthanc.clear()
        oauth_destination(orthanc_gateway, oauth_ca, rule, kind="dicomweb")

        delivery = deliver_one(data_dir, rule)

        assert delivery.state == DeliveryState.DELIVERED, delivery.last_error
        assert orthanc.find_instances({"SOPInstanceUID": delivery.idempotency_key})
        assert len(orthanc_gateway.token_requests) == 1

    @pytest.mark.django_db(transaction=True)
    def test_a_poll_source_queries_and_retrieves_with_a_token_then_reports_a_revoked_client(
        self, data_dir, orthanc, orthanc_gateway, oauth_ca, settings
    ):
        settings.AE_TITLE = "PACSLENS"
        orthanc.clear()
        uid = orthanc_study(orthanc, 2)
        source = PollSource(
            name="cloud-vna",
            kind="dicomweb",
            dicomweb_url=orthanc_gateway.url,
            oauth_token_url=orthanc_gateway.token_url,
            oauth_client_id=CLIENT_ID,
            oauth_client_secret=CLIENT_SECRET,
            ca_bundle=oauth_ca.bundle,
            min_query_spacing_seconds=0,
        )
        source.full_clean()
        source.save()

        poll = poll_now(source)

        assert (poll.status, poll.retrieved) == ("ok", 1), poll.error
        assert Study.objects.get(study_instance_uid=uid).instances.count() == 2
        assert len(orthanc_gateway.token_requests) == 1  # QIDO-RS and WADO-RS shared it

        orthanc_gateway.revoke_client(CLIENT_ID)
        failed = poll_now(source)

        assert failed.status == "failed"
        assert "token error: token endpoint 127.0.0.1:" in failed.error and "invalid_client" in failed.error

    def test_the_test_button_fetches_a_token_and_reports_a_refusal(self, rule, orthanc_gateway, oauth_ca):
        destination = oauth_destination(orthanc_gateway, oauth_ca, rule, kind="dicomweb")
        assert probe_destination(destination).ok

        orthanc_gateway.revoke_client(CLIENT_ID)
        OAuthToken.objects.all().delete()
        result = probe_destination(destination)

        assert not result.ok and result.summary == "no OAuth token" and "invalid_client" in result.reason


HTTP_FIELDS = (
    "oauth_token_url",
    "oauth_client_id",
    "oauth_client_secret",
    "oauth_scope",
    "oauth_audience",
    "ca_bundle",
)


class TestSecretsStayWriteOnly:
    def test_the_client_secret_is_masked_in_the_audit_and_absent_from_the_export(self, db):
        destination = Destination.objects.create(
            name="cloud",
            kind="fhir",
            base_url="https://fhir.example/R4",
            auth="oauth2",
            oauth_token_url="https://idp.example/token",
            oauth_client_id="pacslens",
            oauth_client_secret=CLIENT_SECRET,
        )
        assert config_snapshot(destination)["oauth_client_secret"] == MASK
        [entry] = DestinationsSection().export()
        assert entry["oauth_token_url"] == "https://idp.example/token" and "oauth_client_secret" not in entry

        # Re-imported without the secret: kept. With another token URL and no secret: refused.
        assert DestinationsSection().validate([entry]) == []
        moved = {**entry, "oauth_token_url": "https://elsewhere.example/token"}
        [problem] = DestinationsSection().validate([moved])
        assert "field 'oauth_client_secret': the target or auth changed" in problem
        assert DestinationsSection().validate([{**moved, "oauth_client_secret": "new"}]) == []

    def test_the_form_never_renders_the_secret_and_asks_again_when_the_token_url_changes(self, db):
        destination = Destination.objects.create(
            name="cloud",
            kind="fhir",
            base_url="https://fhir.example/R4",
            auth="oauth2",
            oauth_token_url="https://idp.example/token",
            oauth_client_id="pacslens",
            oauth_client_secret=CLIENT_SECRET,
        )
        data = {f: getattr(destination, f) for f in DestinationForm.Meta.fields if f not in ("rules",)}
        data.update(oauth_client_secret="", secret="", application_entity="", port="")
        form = DestinationForm(instance=destination)
        assert CLIENT_SECRET not in str(form) and 'placeholder="(unchanged)"' in str(form["oauth_client_secret"])

        kept = DestinationForm(data={**data}, instance=destination)
        assert kept.is_valid(), kept.errors
        assert kept.save().oauth_client_secret == CLIENT_SECRET

        destination.refresh_from_db()
        moved = DestinationForm(data={**data, "oauth_token_url": "https://evil.example/token"}, instance=destination)
        assert not moved.is_valid() and "enter the OAuth client secret again" in moved.errors["oauth_client_secret"][0]
