"""The peers and generators every test shares, and the benchmarks reuse (public names only).

`net` (free ports, required programs), `ct` (synthetic CT), `dicom_files` (Part 10 bytes),
`orthanc`, `dicom_peers` (stub SCP), `mllp` (a RIS), `fhir_router` (a real FHIR server, Medplum),
`fhir_server` (a FHIR stub for fault injection), `listener_proc` (the
listener as a subprocess), `postgres`, `factories` (database rows), `sr` (result payloads),
`identities` (their result identities), `pull` (a PACS to poll). Their fixtures are
registered in tests/conftest.py.
"""
