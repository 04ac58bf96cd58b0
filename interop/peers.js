// The node peers of sturdy's interop tests, all on 127.0.0.1, in one process:
//
// - oauth:     oauth2-mock-server (client credentials). Every client id must present the
//              secret "interop-secret" (HTTP Basic or form body), else 401 invalid_client.
//              A client id of the form "ttl<N>-..." gets tokens with expires_in = N seconds.
// - api:       a resource server that verifies the server's JWTs (signature, issuer, exp) with
//              jose; an invalid or expired token gets 401. /whoami -> 200 {client_id, jti,
//              scope, method, bytes}; /revoke-first-token -> 401 for every request with the
//              first token a client id presents there, 200 with any later token;
//              /always-401 -> 401; everything else 404.
// - stats:     GET /stats?client=<id> -> {tokens, api_calls, api_401, invalid_401,
//              rejected_secrets}, counted per client id.
// - json:      json-server 0.17 with /items (100 items, ids 1..100) and `_page`/`_limit` Link
//              pagination.
// - backend:   the origin behind HAProxy: counts requests per path and per Idempotency-Key;
//              /truncate-odd answers every odd hit with a body cut short (Content-Length 64,
//              7 bytes sent, then the socket is destroyed); /crash-odd destroys the socket
//              without an answer on every odd hit, after counting it (HAProxy then answers 502);
//              /slow-<MS>-... answers 200 after MS ms; /trickle-<MS>-... sends a 40-byte body one
//              byte every MS ms; /stall-body... sends the head and 8 bytes of a 64-byte body, then nothing for 10 s;
//              /count?path=/x -> {"hits": n, "keys": {...}}.
// - blackhole: a TCP server that accepts connections and never answers.
// - odd:       an odd token endpoint (POST /token), in front of the oauth server. What it does
//              depends on the client id (HTTP Basic or form body): "slow<MS>-..." waits MS ms,
//              then forwards; "exp_<NAME>-..." forwards and replaces expires_in with one of
//              EXPIRES[NAME]; "echo<N>-..." answers 400 invalid_request whose
//              error_description is N "x" then the request body and its Authorization header; "down-..." answers 503 with
//              Retry-After: 1. GET /count?client=<id> -> {"requests": n}, per client id.
//
// Usage: node peers.js <ports.json>. The ports are written to the file once every server
// listens; the process runs until SIGTERM or SIGINT.
'use strict';

const fs = require('node:fs');
const http = require('node:http');
const net = require('node:net');
const { OAuth2Server } = require('oauth2-mock-server');
const jose = require('jose');
const jsonServer = require('json-server');

const HOST = '127.0.0.1';
const SECRET = 'interop-secret';

const stats = new Map();
function statsOf(client) {
  if (!stats.has(client)) stats.set(client, { tokens: 0, api_calls: 0, api_401: 0, invalid_401: 0, rejected_secrets: 0 });
  return stats.get(client);
}

function listen(server, port = 0) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, HOST, () => resolve(server.address().port));
  });
}

function clientOf(req) {
  const auth = req.headers.authorization || '';
  if (auth.toLowerCase().startsWith('basic ')) {
    const decoded = Buffer.from(auth.slice(6).trim(), 'base64').toString('utf8');
    const i = decoded.indexOf(':');
    if (i >= 0) {
      return {
        id: decodeURIComponent(decoded.slice(0, i).replace(/\+/g, ' ')),
        secret: decodeURIComponent(decoded.slice(i + 1).replace(/\+/g, ' ')),
      };
    }
  }
  const body = req.body || {};
  return { id: body.client_id, secret: body.client_secret };
}

async function startOauth() {
  const server = new OAuth2Server();
  await server.issuer.keys.generate('RS256');
  const service = server.service;
  service.on('beforeTokenSigning', (token, req) => {
    const { id } = clientOf(req);
    token.payload.client_id = id;
    token.payload.jti = `${id}-${Date.now()}-${Math.random().toString(16).slice(2)}`;
    const ttl = /^ttl(\d+)-/.exec(id || '');
    if (ttl) token.payload.exp = token.payload.iat + Number(ttl[1]);
  });
  service.on('beforeResponse', (response, req) => {
    const { id, secret } = clientOf(req);
    const s = statsOf(id || '');
    if (secret !== SECRET) {
      s.rejected_secrets += 1;
      response.statusCode = 401;
      response.body = { error: 'invalid_client', error_description: 'client authentication failed' };
      return;
    }
    s.tokens += 1;
    const ttl = /^ttl(\d+)-/.exec(id || '');
    if (ttl) response.body.expires_in = Number(ttl[1]);
  });
  await server.start(0, HOST);
  const port = server.address().port;
  return { server, port };
}

async function startApi(oauth) {
  const issuer = oauth.server.issuer;
  const jwks = jose.createLocalJWKSet({ keys: issuer.keys.toJSON() });
  // Per client id, the first token that calls /revoke-first-token is treated as revoked.
  const revoked = new Map();
  const api = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => answer(req, res, Buffer.concat(chunks)).catch(() => res.destroy()));
  });
  async function answer(req, res, body) {
    const send = (status, json) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(json));
    };
    const url = new URL(req.url, `http://${HOST}`);
    const auth = req.headers.authorization || '';
    if (!auth.startsWith('Bearer ')) return send(401, { error: 'no bearer token' });
    const token = auth.slice(7);
    let payload;
    try {
      ({ payload } = await jose.jwtVerify(token, jwks, { issuer: issuer.url }));
    } catch (e) {
      try {
        const claims = jose.decodeJwt(token);
        statsOf(claims.client_id || '').invalid_401 += 1;
      } catch (_) {
        // not a JWT at all
      }
      res.setHeader('www-authenticate', 'Bearer error="invalid_token"');
      return send(401, { error: `invalid token: ${e.code || e.message}` });
    }
    const s = statsOf(payload.client_id || '');
    s.api_calls += 1;
    const me = { client_id: payload.client_id, jti: payload.jti, scope: payload.scope, method: req.method, bytes: body.length };
    if (url.pathname === '/whoami') return send(200, me);
    if (url.pathname === '/revoke-first-token') {
      if (!revoked.has(payload.client_id)) revoked.set(payload.client_id, payload.jti);
      if (revoked.get(payload.client_id) === payload.jti) {
        s.api_401 += 1;
        res.setHeader('www-authenticate', 'Bearer error="invalid_token", error_description="revoked"');
        return send(401, { error: 'token revoked' });
      }
      return send(200, me);
    }
    if (url.pathname === '/always-401') {
      s.api_401 += 1;
      res.setHeader('www-authenticate', 'Bearer error="invalid_token"');
      return send(401, { error: 'never authorised' });
    }
    return send(404, { error: 'not found' });
  }
  return listen(api);
}

function startStats() {
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, `http://${HOST}`);
    req.resume();
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(statsOf(url.searchParams.get('client') || '')));
  });
  return listen(server);
}

function startJsonServer() {
  const items = [];
  for (let id = 1; id <= 100; id += 1) items.push({ id, name: `item-${id}` });
  const app = jsonServer.create();
  app.use(jsonServer.defaults({ logger: false }));
  app.use(jsonServer.router({ items }));
  return listen(http.createServer(app));
}

function startBackend() {
  const hits = new Map();
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, `http://${HOST}`);
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      if (url.pathname === '/count') {
        const h = hits.get(url.searchParams.get('path')) || { hits: 0, keys: {} };
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify(h));
        return;
      }
      if (!hits.has(url.pathname)) hits.set(url.pathname, { hits: 0, keys: {} });
      const h = hits.get(url.pathname);
      h.hits += 1;
      const key = req.headers['idempotency-key'];
      if (key) h.keys[key] = (h.keys[key] || 0) + 1;
      if (url.pathname === '/crash-odd' && h.hits % 2 === 1) {
        res.socket.destroy();
        return;
      }
      const slow = /^\/slow-(\d+)-/.exec(url.pathname);
      if (slow) {
        const body = JSON.stringify({ path: url.pathname, method: req.method, hit: h.hits });
        setTimeout(() => {
          res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
          res.end(body);
        }, Number(slow[1]));
        return;
      }
      const trickle = /^\/trickle-(\d+)-/.exec(url.pathname);
      if (trickle) {
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': '40' });
        let sent = 0;
        const timer = setInterval(() => {
          if (res.destroyed) return clearInterval(timer);
          sent += 1;
          res.write(sent === 1 ? '"' : sent === 40 ? '"' : 'x');
          if (sent === 40) {
            clearInterval(timer);
            res.end();
          }
        }, Number(trickle[1]));
        return;
      }
      if (url.pathname.startsWith('/stall-body')) {
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': '64' });
        res.write('{"slow":');
        setTimeout(() => res.socket.destroy(), 10000);
        return;
      }
      if (url.pathname === '/truncate-odd' && h.hits % 2 === 1) {
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': '64' });
        res.write('{"cut":');
        setTimeout(() => res.socket.destroy(), 20);
        return;
      }
      const body = JSON.stringify({ path: url.pathname, method: req.method, hit: h.hits, bytes: Buffer.concat(chunks).length });
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
      res.end(body);
    });
  });
  return listen(server);
}

function startBlackhole() {
  const sockets = new Set();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    socket.on('close', () => sockets.delete(socket));
    // Reads whatever comes and never answers.
    socket.resume();
  });
  return listen(server);
}

// expires_in values other servers send now and then.
const EXPIRES = {
  str: '3600',
  float: 2.5,
  neg: -30,
  zero: 0,
  huge: 1e12,
  null: null,
  text: 'soon',
};

function startOddTokens(oauthPort) {
  const counts = new Map();
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, `http://${HOST}`);
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const raw = Buffer.concat(chunks);
      if (url.pathname === '/count') {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ requests: counts.get(url.searchParams.get('client')) || 0 }));
        return;
      }
      const form = Object.fromEntries(new URLSearchParams(raw.toString('utf8')));
      const { id } = clientOf({ headers: req.headers, body: form });
      counts.set(id || '', (counts.get(id || '') || 0) + 1);
      const send = (status, json, headers = {}) => {
        res.writeHead(status, { 'content-type': 'application/json', ...headers });
        res.end(JSON.stringify(json));
      };
      const echo = /^echo(\d*)-/.exec(id || '');
      if (echo) {
        const pad = 'x'.repeat(Number(echo[1] || 0));
        return send(400, {
          error: 'invalid_request',
          error_description: `${pad}could not read ${raw.toString('utf8')} (authorization: ${req.headers.authorization || 'none'})`,
        });
      }
      if (/^down-/.test(id || '')) {
        return send(503, { error: 'temporarily_unavailable' }, { 'retry-after': '1' });
      }
      const slow = /^slow(\d+)-/.exec(id || '');
      const exp = /^exp_([a-z]+)-/.exec(id || '');
      const forward = () => {
        const up = http.request(
          { host: HOST, port: oauthPort, method: 'POST', path: '/token', headers: req.headers },
          (ur) => {
            const parts = [];
            ur.on('data', (c) => parts.push(c));
            ur.on('end', () => {
              let body = Buffer.concat(parts).toString('utf8');
              if (exp && ur.statusCode === 200) {
                const json = JSON.parse(body);
                json.expires_in = EXPIRES[exp[1]];
                body = JSON.stringify(json);
              }
              res.writeHead(ur.statusCode, { 'content-type': 'application/json' });
              res.end(body);
            });
          },
        );
        up.on('error', () => res.destroy());
        up.end(raw);
      };
      if (slow) setTimeout(forward, Number(slow[1]));
      else forward();
    });
  });
  return listen(server);
}

async function main() {
  const out = process.argv[2];
  if (!out) {
    console.error('usage: node peers.js <ports.json>');
    process.exit(2);
  }
  const oauth = await startOauth();
  const ports = {
    oauth: oauth.port,
    api: await startApi(oauth),
    stats: await startStats(),
    json: await startJsonServer(),
    backend: await startBackend(),
    blackhole: await startBlackhole(),
  };
  ports.odd = await startOddTokens(oauth.port);
  fs.writeFileSync(`${out}.tmp`, JSON.stringify(ports));
  fs.renameSync(`${out}.tmp`, out);
  const stop = () => process.exit(0);
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
