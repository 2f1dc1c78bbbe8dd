// The parts every browser test uses: the real `herald` binary, Debian's Chromium,
// a page on Herald's origin that loads /herald.js, and a TCP proxy that can cut
// connections without closing them.

import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const API_KEY = 'browser-tests-api-key-0123456789';
export const JWT_SECRET = 'browser-tests-jwt-secret-0123456789abcdef';
/** How long a test waits for anything the browser should see (the CI machine is busy). */
export const SOON = 30_000;

const CHROMIUM = process.env.HERALD_CHROMIUM ?? '/usr/bin/chromium';

let built = null;

/** Builds `herald` once per test file (incremental; the client is embedded, so it must be fresh). */
export function heraldBin() {
  if (built) return built;
  const result = spawnSync(
    'cargo',
    ['build', '--quiet', '-p', 'herald-gateway', '--bin', 'herald'],
    { cwd: ROOT, stdio: 'inherit' },
  );
  if (result.status !== 0) throw new Error('cargo build -p herald-gateway --bin herald failed');
  const target = process.env.CARGO_TARGET_DIR ?? join(ROOT, 'target');
  built = join(target, 'debug', 'herald');
  return built;
}

export function tempDir(prefix) {
  return mkdtempSync(join(tmpdir(), `herald-${prefix}-`));
}

/**
 * Starts `herald serve` on `bind` (default a free port) with its store in `store`.
 * Answers `{ base, port, stop(), exited }` once it logged `listening on <addr>`.
 */
export async function startHerald({ store = tempDir('store'), bind = '127.0.0.1:0', env = {} } = {}) {
  const child = spawn(heraldBin(), ['serve'], {
    env: {
      PATH: process.env.PATH,
      RUST_LOG: 'info',
      NO_COLOR: '1',
      HERALD_CONFIG: join(ROOT, 'config/default.toml'),
      HERALD_SERVER__BIND: bind,
      HERALD_SERVER__WORKERS: '2',
      HERALD_STORE__PATH: store,
      HERALD_AUTH__API_KEYS: API_KEY,
      HERALD_AUTH__JWT_SECRET: JWT_SECRET,
      HERALD_HEARTBEAT__INTERVAL_MS: '1000',
      HERALD_HEARTBEAT__TIMEOUT_MS: '4000',
      ...env,
    },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const exited = once(child, 'exit');
  const log = [];
  const addr = await new Promise((resolveAddr, reject) => {
    const timer = setTimeout(() => reject(new Error(`herald did not start:\n${log.join('')}`)), SOON);
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      log.push(chunk);
      // eslint-disable-next-line no-control-regex
      const found = log.join('').replace(/\x1b\[[0-9;]*m/g, '').match(/listening on (\S+:\d+)/);
      if (found) {
        clearTimeout(timer);
        resolveAddr(found[1]);
      }
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`herald exited (${code}) before listening:\n${log.join('')}`));
    });
  });
  return {
    base: `http://${addr}`,
    port: Number(addr.split(':').pop()),
    store,
    log,
    exited,
    /** SIGTERM, then waits for the exit (SIGKILL if it hangs). */
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGTERM');
      const killer = setTimeout(() => child.kill('SIGKILL'), SOON);
      await exited;
      clearTimeout(killer);
    },
  };
}

/** Debian's Chromium, headless, with a fresh profile. Never a downloaded browser. */
export async function launchBrowser() {
  const profile = tempDir('chromium');
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    viewport: { width: 900, height: 720 },
  });
  return {
    context,
    async close() {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

export async function publish(base, user, body) {
  const response = await fetch(`${base}/v1/users/${encodeURIComponent(user)}/notifications`, {
    method: 'POST',
    headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  if (response.status !== 202) throw new Error(`publish: ${response.status} ${await response.text()}`);
  return response.json();
}

export async function mintToken(base, user, ttlSecs = 3600) {
  const response = await fetch(`${base}/v1/tokens`, {
    method: 'POST',
    headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify({ user, ttl_secs: ttlSecs }),
  });
  if (response.status !== 200) throw new Error(`mint: ${response.status} ${await response.text()}`);
  return (await response.json()).token;
}

// Recording code added to a page that Herald itself served (same origin, so
// /herald.js is a same-origin module import, and the page's address is Herald's:
// a page the test runner made up would be "public" to Chromium's local network
// access checks and could not open a socket to 127.0.0.1). It also counts the
// sockets the page holds at once.
const SOCKET_COUNTER = `
  const Native = window.WebSocket;
  window.sockets = { created: 0, live: 0, maxLive: 0, urls: [] };
  window.WebSocket = class extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      sockets.created += 1;
      sockets.live += 1;
      sockets.maxLive = Math.max(sockets.maxLive, sockets.live);
      sockets.urls.push(String(url));
      let ended = false;
      this.end = () => { if (!ended) { ended = true; sockets.live -= 1; } };
      this.addEventListener('close', this.end);
    }
    close(...args) { this.end(); super.close(...args); }
  };`;

const RECORDER = `
  import { Herald } from '/herald.js';
  window.log = { notifications: [], states: [], gaps: [], errors: [] };
  window.startHerald = (options) => {
    const { refreshTokens, ...rest } = options;
    if (refreshTokens) rest.getToken = () => window.nodeMintToken(rest.user);
    const herald = new Herald(rest);
    herald.on('notification', (n) => log.notifications.push(n));
    herald.on('state', (s) => log.states.push({ state: s.state, reason: s.reason, code: s.code }));
    herald.on('gap', (g) => log.gaps.push(g));
    herald.on('error', (e) => log.errors.push({ code: e.code, message: e.message }));
    window.herald = herald;
  };
  window.pageReady = true;`;

/** Opens a tab on Herald's origin with the recorder; `getToken` (optional) serves `refreshTokens`. */
export async function openTestPage(context, base, { getToken } = {}) {
  const page = await context.newPage();
  page.on('pageerror', (error) => process.stderr.write(`page error: ${error}\n`));
  if (getToken) await page.exposeFunction('nodeMintToken', getToken);
  await page.goto(`${base}/healthz`);
  await page.addScriptTag({ content: SOCKET_COUNTER });
  await page.addScriptTag({ type: 'module', content: RECORDER });
  await page.waitForFunction(() => window.pageReady === true, null, { timeout: SOON });
  return page;
}

/** Starts a client in `page`; `options` are Herald's (plus `refreshTokens: true`). */
export async function subscribe(page, options) {
  await page.evaluate((opts) => window.startHerald(opts), options);
  await waitFor(page, () => window.herald.state === 'open');
}

export async function waitFor(page, predicate, arg, timeout = SOON) {
  await page.waitForFunction(predicate, arg, { timeout, polling: 50 });
}

/** Waits until `page` holds at least `count` notifications; answers their seqs. */
export async function waitForNotifications(page, count) {
  await waitFor(page, (n) => window.log.notifications.length >= n, count);
  return page.evaluate(() => window.log.notifications.map((n) => n.seq));
}

export const pageLog = (page) => page.evaluate(() => window.log);
export const socketStats = (page) => page.evaluate(() => window.sockets);

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/**
 * A TCP proxy to `target` port. `freeze()` stops forwarding on every current
 * connection in both directions without closing anything (a dead NAT entry, a
 * sleeping laptop's Wi-Fi); `cut()` destroys them. New connections forward normally.
 */
export async function startProxy(targetPort) {
  const pairs = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(targetPort, '127.0.0.1');
    const pair = { client, upstream, frozen: false };
    pairs.add(pair);
    const forward = (from, to) => {
      from.on('data', (chunk) => {
        if (!pair.frozen) to.write(chunk);
      });
      from.on('end', () => {
        if (!pair.frozen) to.end();
      });
      from.on('error', () => {});
      from.on('close', () => {
        if (!pair.frozen) to.destroy();
        pairs.delete(pair);
      });
    };
    forward(client, upstream);
    forward(upstream, client);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: server.address().port,
    get connections() {
      return pairs.size;
    },
    freeze() {
      for (const pair of pairs) pair.frozen = true;
    },
    cut() {
      for (const pair of pairs) {
        pair.client.destroy();
        pair.upstream.destroy();
      }
    },
    async close() {
      for (const pair of pairs) {
        pair.client.destroy();
        pair.upstream.destroy();
      }
      server.close();
    },
  };
}

export function screenshotDir() {
  const dir = process.env.HERALD_SCREENSHOTS ?? join(ROOT, 'target', 'browser-tests');
  mkdirSync(dir, { recursive: true });
  return dir;
}
