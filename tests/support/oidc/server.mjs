// A real OpenID Connect provider (panva's oidc-provider) on loopback, issuing the JWT access tokens that
// dicomhub's authentication tests use. Run: node server.mjs PORT   (environment: OIDC_AUDIENCE)
//
// Every client gets tokens with the client_credentials grant (secret = client id). What distinguishes the
// clients is in CLIENTS: the roles put in the token, the claim they go in, the lifetime, the signing algorithm,
// or a claim changed after the provider built the token (still signed by the provider's own key).
// POST /admin/rotate publishes a new RS256 key, signs with it from then on and answers its kid; the old keys stay
// published (as a provider rotating its keys does).
import * as http from 'node:http';

import { exportJWK, generateKeyPair } from 'jose';
import Provider from 'oidc-provider';

const port = Number(process.argv[2] || 9000);
const issuer = `http://127.0.0.1:${port}`;
const audience = process.env.OIDC_AUDIENCE || 'api://dicomhub';

const inAnHour = () => Math.floor(Date.now() / 1000) + 3600;
const CLIENTS = {
  admin: { roles: ['globalAdmin'] },
  reader: { roles: ['globalReader'] },
  writer: { roles: ['globalWriter'] },
  owner: { roles: ['DICOM Data Owner'] },
  datareader: { roles: ['DICOM Data Reader'] },
  norole: {},
  emptyroles: { roles: [] },
  unknown: { roles: ['nope'] },
  otherclaim: { claim: 'groups', roles: ['globalAdmin'] },
  single: { roles: 'globalReader' },
  partitionreader: { roles: ['partitionReader'] },
  readerwriter: { roles: ['globalReader', 'writeOnly'] },
  shortlived: { roles: ['globalAdmin'], ttl: 1 },
  ecadmin: { roles: ['globalAdmin'], alg: 'ES256' },
  psadmin: { roles: ['globalAdmin'], alg: 'PS256' },
  notyet: { roles: ['globalAdmin'], change: (payload) => { payload.nbf = inAnHour(); } },
  noexp: { roles: ['globalAdmin'], change: (payload) => { delete payload.exp; } },
  otherissuer: { roles: ['globalAdmin'], change: (payload) => { payload.iss = 'http://127.0.0.1:1/other'; } },
};

async function signingKey(alg, kid) {
  const { privateKey } = await generateKeyPair(alg, { extractable: true });
  return { ...(await exportJWK(privateKey)), kid, alg, use: 'sig' };
}

function configuration(keys) {
  return {
    clients: Object.keys(CLIENTS).map((id) => ({
      client_id: id,
      client_secret: id,
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
    })),
    jwks: { keys },
    features: {
      clientCredentials: { enabled: true },
      devInteractions: { enabled: false },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => audience,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resource, client) => ({
          scope: 'dicom',
          audience: resource,
          accessTokenFormat: 'jwt',
          accessTokenTTL: CLIENTS[client.clientId].ttl || 3600,
          jwt: { sign: { alg: CLIENTS[client.clientId].alg || 'RS256' } },
        }),
      },
    },
    extraTokenClaims: (ctx, token) => {
      const client = CLIENTS[token.clientId];
      return client.roles === undefined ? undefined : { [client.claim || 'roles']: client.roles };
    },
    formats: {
      customizers: {
        jwt: (ctx, token, jwt) => {
          CLIENTS[token.clientId].change?.(jwt.payload);
        },
      },
    },
  };
}

const keys = [await signingKey('RS256', 'rs-1'), await signingKey('ES256', 'es-1'), await signingKey('PS256', 'ps-1')];
let provider = new Provider(issuer, configuration(keys));
let rotations = 1;

const server = http.createServer(async (req, res) => {
  if (req.method === 'POST' && req.url === '/admin/rotate') {
    rotations += 1;
    const key = await signingKey('RS256', `rs-${rotations}`);
    keys.unshift(key); // the first RS256 key signs
    provider = new Provider(issuer, configuration(keys));
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ kid: key.kid }));
    return;
  }
  provider.callback()(req, res);
});

function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
server.listen(port, '127.0.0.1', () => console.log(`oidc provider ${issuer} audience ${audience}`));
