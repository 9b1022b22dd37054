"""Two PacsLens installations, one hospital: their results never share an identifier.

Two gateways, each a fresh database in its own data dir (so their row ids run in step, as after
a reinstall), take a study each through the real pipeline (storescu → listener → workers) and
deliver to the same Orthanc (SR by C-STORE), the same FHIR server and the same MLLP RIS. With
identifiers derived from row ids, the second gateway's SR, Observation and MSH-10 were the
first's; now each receiver holds two, and a re-send adds no third.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from pacslens.demo_study import demo_study_write
from tests.support.fhir_router import TOKEN, FHIRRouterPeer
from tests.support.listener_proc import PYTHON, REPO, ListenerProcess, base_env, template_db_create
from tests.support.mllp import MLLPListener
from tests.support.net import free_port

pytestmark = pytest.mark.interop

RULE = "Demo: CT head to the demonstration model"


def site_config(orthanc, ris: MLLPListener, fhir: FHIRRouterPeer) -> str:
    return f"""\
pacslens_config: 1
ae_titles:
- {{ae_title: {orthanc.aet}, host: 127.0.0.1, port: {orthanc.dicom_port}, may_send: false, receives_results: true}}
destinations:
- {{name: pacs, kind: dicom, application_entity: {orthanc.aet}, rules: ['{RULE}']}}
- {{name: ris, kind: hl7, host: 127.0.0.1, port: {ris.port}, hl7_message_type: ORU^R01, rules: ['{RULE}']}}
- {{name: fhir, kind: fhir, base_url: '{fhir.url}', auth: bearer, secret: {TOKEN}, rules: ['{RULE}']}}
"""


class Gateway:
    """One installation: a fresh database, `setup_site`, the site YAML, a listener and workers."""

    def __init__(self, folder: Path, config: str) -> None:
        template_db_create(folder)  # migrates a new database in `folder`: a new installation
        port = free_port()
        env = base_env(
            folder, PACSLENS_DICOM_PORT=str(port), PACSLENS_STUDY_RELEASE_GRACE="0.5", PACSLENS_STUDY_QUIET_PERIOD="30"
        )
        (folder / "site.yaml").write_text(config)
        for command in (["setup_site"], ["import_config", str(folder / "site.yaml")]):
            self.manage(env, *command)
        self.env = env
        self.listener = ListenerProcess(data_dir=folder, port=port, env=env).start()
        log = open(folder / "workers.log", "ab")  # noqa: SIM115 - handed to the child, closed below
        self.workers = subprocess.Popen(
            [PYTHON, "manage.py", "run_workers"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    @staticmethod
    def manage(env: dict[str, str], *command: str) -> str:
        done = subprocess.run(
            [PYTHON, "manage.py", *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def send(self, paths: list[Path]) -> None:
        done = self.listener.storescu(paths)
        assert done.returncode == 0, done.stderr

    def deliveries(self) -> list[dict]:
        return self.listener.query(
            "SELECT d.id, d.kind, d.state, d.idempotency_key, d.last_error, d.result_id FROM results_delivery d ORDER BY d.kind"
        )

    def wait_delivered(self, count: int, timeout: float = 120.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        rows: list[dict] = []
        while time.monotonic() < deadline:
            rows = self.deliveries()
            if len(rows) == count and all(r["state"] == "delivered" for r in rows):
                return rows
            time.sleep(0.3)
        log = (self.listener.data_dir / "workers.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"not delivered in {timeout} s: {rows}\n{log}")

    def installation(self) -> str:
        [row] = self.listener.query("SELECT uuid FROM results_installation")
        return row["uuid"]

    def stop(self) -> None:
        self.workers.terminate()
        try:
            self.workers.wait(60)
        except subprocess.TimeoutExpired:
            self.workers.kill()
        self.listener.stop()


@pytest.fixture
def peers(orthanc, mllp, fhir_router):
    orthanc.clear()
    return orthanc, mllp, fhir_router


def test_two_installations_never_share_an_identifier(peers, tmp_path):
    orthanc, ris, fhir = peers
    config = site_config(orthanc, ris, fhir)
    gateways = [Gateway(tmp_path / name, config) for name in ("gateway-a", "gateway-b")]
    try:
        studies = [demo_study_write(outdir=tmp_path / f"study-{n}", slices=16, size=64, seed=n) for n in (1, 2)]
        for gateway, study in zip(gateways, studies, strict=True):
            gateway.send(study.paths)
        rows = [{r["kind"]: r for r in gateway.wait_delivered(3)} for gateway in gateways]

        assert gateways[0].installation() != gateways[1].installation()
        # The row ids repeat across the two databases, exactly what used to repeat the keys.
        assert rows[0]["hl7"]["result_id"] == rows[1]["hl7"]["result_id"]
        for kind in ("dicom", "hl7", "fhir"):
            assert rows[0][kind]["idempotency_key"] != rows[1][kind]["idempotency_key"], kind

        srs = orthanc.find_instances({"Modality": "SR"})
        assert len(srs) == 2
        assert {orthanc.instance_tags(sr["ID"])["StudyInstanceUID"] for sr in srs} == {
            s.study_instance_uid for s in studies
        }
        assert sorted(ris.received) == sorted(r["hl7"]["idempotency_key"] for r in rows)
        observations = fhir.search("Observation")
        assert sorted(o["identifier"][0]["value"] for o in observations) == sorted(
            r["fhir"]["idempotency_key"] for r in rows
        )
        for study, row in zip(studies, rows, strict=True):
            [imaging_study] = fhir.search(
                "ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study.study_instance_uid}"
            )
            linked = [e["valueReference"]["identifier"]["value"] for e in imaging_study["extension"]]
            assert linked == [row["fhir"]["idempotency_key"]]

        # A re-send from the first gateway: the same keys, so no receiver holds a third copy.
        out = Gateway.manage(gateways[0].env, "deliver", studies[0].study_instance_uid, "--wait", "60")
        assert out.count("delivered") == 3, out
        assert len(orthanc.find_instances({"Modality": "SR"})) == 2
        assert len(fhir.search("Observation")) == 2
        assert sorted(ris.received) == sorted(
            [rows[0]["hl7"]["idempotency_key"]] * 2 + [rows[1]["hl7"]["idempotency_key"]]
        )
    finally:
        for gateway in gateways:
            gateway.stop()
