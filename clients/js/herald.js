// herald.js: Herald's browser client. One ES module, no dependencies, no build step.
//
//   import { Herald } from '/herald.js';
//   const herald = new Herald({ user: 'alice', getToken: () => fetchMyToken() });
//   herald.on('notification', (n) => show(n.event, n.data));
//   herald.on('state', (s) => badge(s.state));
//
// What it takes care of, so an app does not have to:
// - Heartbeat. Browsers cannot see WebSocket Ping frames, so the client sends
//   {"type":"ping"} at the interval the server announces in `hello` and declares
//   the socket dead when nothing at all arrives within the timeout after a ping.
// - Reconnection with exponential backoff and full jitter, capped, back to the
//   shortest delay once a connection has stayed up for a while. Never two sockets
//   at once; nothing more after close().
// - Resume. Every reconnect asks for `since = lastSeq`, duplicates are dropped by
//   seq, and anything the server could no longer replay is reported as a `gap`.
// - Tokens. getToken() is called again before a reconnect when the token's `exp`
//   has passed, or when the upgrade failed before the socket opened (a browser
//   cannot see the HTTP 401, so such a failure is treated as a possible one).
// - Waking up. The `online` event and the tab becoming visible reconnect at once
//   when the socket died, and probe it with a ping when it looks alive.

const EVENTS = new Set(['notification', 'broadcast', 'state', 'gap', 'error']);

const DEFAULTS = {
  // Backoff: the n-th retry waits a random time in [0, min(maxMs, initialMs * 2^n)).
  backoff: { initialMs: 500, maxMs: 30000, stableMs: 10000 },
  // From starting a socket to receiving `hello`.
  connectTimeoutMs: 15000,
  // A token whose `exp` is closer than this is refreshed before it is used.
  tokenMarginMs: 1000,
};

// Used until `hello` announces the server's settings.
const FALLBACK_HEARTBEAT = { intervalMs: 20000, timeoutMs: 45000 };

const PING = '{"type":"ping"}';

// Close codes the client itself sends (browsers allow 1000 and 3000-4999).
const CLOSE_NORMAL = 1000;
const CLOSE_DEAD = 4000;

export class Herald {
  #options;
  #WebSocket;
  #handlers = new Map();
  #state = 'idle';
  #closed = false;

  #ws = null;
  #connecting = false;
  #generation = 0;
  #hello = null;
  #lastSeq = null;

  #token = null;
  #tokenStale = false;
  #attempt = 0;

  #retryTimer = null;
  #connectTimer = null;
  #pingTimer = null;
  #deadTimer = null;
  #stableTimer = null;
  #unlisten = [];

  /** @param {import('./herald').HeraldOptions} options */
  constructor(options) {
    if (!options || typeof options.user !== 'string' || options.user === '') {
      throw new TypeError('Herald: `user` is required');
    }
    if (options.getToken !== undefined && typeof options.getToken !== 'function') {
      throw new TypeError('Herald: `getToken` must be a function');
    }
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== 'function') {
      throw new TypeError('Herald: no WebSocket implementation; pass `WebSocket`');
    }
    this.#options = {
      ...DEFAULTS,
      ...options,
      backoff: { ...DEFAULTS.backoff, ...options.backoff },
      url: baseUrl(options.url),
    };
    this.#token = options.token ?? null;
    this.#lastSeq = Number.isSafeInteger(options.since) ? options.since : null;
    this.#listenToBrowser();
    // Connect after the caller had a chance to register handlers.
    queueMicrotask(() => this.#connect());
  }

  /** The highest seq delivered to the app (or announced by the first `hello`); null before. */
  get lastSeq() {
    return this.#lastSeq;
  }

  /** 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed' */
  get state() {
    return this.#state;
  }

  /** The current session's id (`s-…`), while open. */
  get session() {
    return this.#state === 'open' ? this.#hello?.session ?? null : null;
  }

  /** Registers `fn` for `event`; answers a function that unregisters it. */
  on(event, fn) {
    if (!EVENTS.has(event)) throw new TypeError(`Herald: unknown event "${event}"`);
    if (typeof fn !== 'function') throw new TypeError('Herald: handler must be a function');
    if (!this.#handlers.has(event)) this.#handlers.set(event, new Set());
    this.#handlers.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this.#handlers.get(event)?.delete(fn);
  }

  /** Closes the socket for good: no reconnect, no more events after `state: closed`. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#generation += 1;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    if (this.#ws) this.#detach(this.#ws, CLOSE_NORMAL, 'client closed');
    for (const unlisten of this.#unlisten) unlisten();
    this.#unlisten = [];
    this.#setState('closed', { reason: 'closed_by_app' });
    this.#handlers.clear();
  }

  // --- connecting -------------------------------------------------------------

  async #connect() {
    if (this.#closed || this.#ws || this.#connecting) return;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    const generation = ++this.#generation;
    this.#connecting = true;
    this.#setState('connecting', { attempt: this.#attempt });
    let token;
    try {
      token = await this.#currentToken();
    } catch (error) {
      if (generation !== this.#generation) return;
      this.#emit('error', {
        code: 'token_unavailable',
        message: `getToken failed: ${error?.message ?? error}`,
        error,
      });
      this.#retry({ reason: 'token_unavailable' });
      return;
    } finally {
      this.#connecting = false;
    }
    // close() was called while the token was being fetched.
    if (generation !== this.#generation) return;

    let ws;
    try {
      ws = new this.#WebSocket(this.#socketUrl(token));
    } catch (error) {
      this.#emit('error', { code: 'bad_url', message: String(error?.message ?? error), error });
      this.#retry({ reason: 'bad_url' });
      return;
    }
    this.#ws = ws;
    this.#hello = null;
    let opened = false;
    this.#connectTimer = setTimeout(
      () => this.#lost(ws, { reason: 'connect_timeout', opened }),
      this.#options.connectTimeoutMs,
    );
    ws.onopen = () => {
      opened = true;
    };
    ws.onmessage = (event) => this.#receive(ws, event.data);
    ws.onclose = (event) =>
      this.#lost(ws, {
        reason: opened ? 'closed' : 'upgrade_failed',
        code: event.code,
        opened,
      });
    // An `error` is always followed by `close`, which decides what happens.
    ws.onerror = () => {};
  }

  async #currentToken() {
    const { getToken, tokenMarginMs } = this.#options;
    const expired = this.#token !== null && expiresWithin(this.#token, tokenMarginMs);
    if (getToken && (this.#token === null || this.#tokenStale || expired)) {
      const token = await getToken();
      if (typeof token !== 'string' || token === '') {
        throw new TypeError('getToken() must answer a non-empty string');
      }
      this.#token = token;
      this.#tokenStale = false;
    }
    return this.#token;
  }

  #socketUrl(token) {
    // ':' and '@' are valid in a path segment; keep user ids like `team:42` readable.
    const user = encodeURIComponent(this.#options.user)
      .replace(/%3A/gi, ':')
      .replace(/%40/gi, '@');
    const query = new URLSearchParams();
    if (token !== null) query.set('token', token);
    if (this.#lastSeq !== null) query.set('since', String(this.#lastSeq));
    const search = query.toString();
    return `${this.#options.url}/ws/${user}${search ? `?${search}` : ''}`;
  }

  // --- receiving --------------------------------------------------------------

  #receive(ws, data) {
    if (ws !== this.#ws) return;
    // Anything at all proves the connection alive.
    clearTimeout(this.#deadTimer);
    this.#deadTimer = null;
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      this.#emit('error', { code: 'bad_frame', message: 'the server sent a frame that is not JSON' });
      return;
    }
    switch (frame?.type) {
      case 'hello':
        this.#onHello(ws, frame);
        break;
      case 'notification':
        this.#onNotification(frame);
        break;
      case 'broadcast':
        this.#emit('broadcast', frame);
        break;
      case 'pong':
        break;
      case 'error':
        this.#emit('error', { code: frame.code, message: frame.message });
        break;
      default:
        // A newer server may send frames this client does not know yet.
        break;
    }
  }

  #onHello(ws, hello) {
    clearTimeout(this.#connectTimer);
    this.#connectTimer = null;
    this.#hello = hello;
    const asked = this.#lastSeq;
    if (asked !== null && hello.seq < asked) {
      // The server's history was replaced (a new store): its seqs start over.
      // It replays everything it has; accept it from the start.
      this.#lastSeq = hello.first_seq - 1;
      this.#emit('gap', {
        reason: 'reset',
        since: asked,
        seq: hello.seq,
        firstSeq: hello.first_seq,
      });
    } else if (asked !== null && hello.recovered === false) {
      // Retention already dropped some of what followed `asked`.
      this.#lastSeq = Math.max(asked, hello.first_seq - 1);
      this.#emit('gap', {
        reason: 'retention',
        since: asked,
        from: asked + 1,
        to: hello.first_seq - 1,
        seq: hello.seq,
        firstSeq: hello.first_seq,
      });
    } else if (asked === null) {
      this.#lastSeq = hello.seq;
    }
    this.#startHeartbeat(ws, hello.heartbeat);
    clearTimeout(this.#stableTimer);
    this.#stableTimer = setTimeout(() => {
      this.#attempt = 0;
    }, this.#options.backoff.stableMs);
    this.#setState('open', { session: hello.session, hello });
  }

  #onNotification(frame) {
    const seq = frame.seq;
    if (!Number.isSafeInteger(seq)) return;
    const last = this.#lastSeq;
    if (last !== null && seq <= last) return;
    if (last !== null && seq > last + 1) {
      this.#emit('gap', { reason: 'missing', since: last, from: last + 1, to: seq - 1 });
    }
    this.#lastSeq = seq;
    this.#emit('notification', frame);
  }

  // --- liveness ---------------------------------------------------------------

  #startHeartbeat(ws, announced) {
    const heartbeat = this.#heartbeat(announced);
    clearInterval(this.#pingTimer);
    this.#pingTimer = setInterval(() => this.#ping(ws, heartbeat.timeoutMs), heartbeat.intervalMs);
  }

  #heartbeat(announced) {
    const own = this.#options.heartbeat;
    return {
      intervalMs: own?.intervalMs ?? announced?.interval_ms ?? FALLBACK_HEARTBEAT.intervalMs,
      timeoutMs: own?.timeoutMs ?? announced?.timeout_ms ?? FALLBACK_HEARTBEAT.timeoutMs,
    };
  }

  // The deadline runs from a ping, not from the last frame: a background tab's
  // timers may fire late, and a late ping must not look like a dead server.
  #ping(ws, timeoutMs) {
    if (ws !== this.#ws || ws.readyState !== this.#WebSocket.OPEN) return;
    try {
      ws.send(PING);
    } catch {
      // The close event follows and decides.
      return;
    }
    if (this.#deadTimer === null) {
      this.#deadTimer = setTimeout(
        () => this.#lost(ws, { reason: 'heartbeat_timeout', opened: true }),
        timeoutMs,
      );
    }
  }

  #listenToBrowser() {
    const target = globalThis;
    if (typeof target.addEventListener !== 'function') return;
    const online = () => this.#wake();
    target.addEventListener('online', online);
    this.#unlisten.push(() => target.removeEventListener('online', online));
    const doc = globalThis.document;
    if (doc && typeof doc.addEventListener === 'function') {
      const visible = () => {
        if (doc.visibilityState === 'visible') this.#wake();
      };
      doc.addEventListener('visibilitychange', visible);
      this.#unlisten.push(() => doc.removeEventListener('visibilitychange', visible));
    }
  }

  // The network came back or the tab was shown: a dead socket reconnects now,
  // a live-looking one is probed (after a sleep it may be half-open).
  #wake() {
    if (this.#closed) return;
    if (this.#retryTimer !== null) {
      this.#connect();
    } else if (this.#ws && this.#hello) {
      this.#ping(this.#ws, this.#heartbeat(this.#hello.heartbeat).timeoutMs);
    }
  }

  // --- losing a socket and retrying ----------------------------------------------

  #lost(ws, { reason, code, opened }) {
    if (ws !== this.#ws || this.#closed) return;
    this.#detach(ws, CLOSE_DEAD, reason);
    // A browser hides the status of a refused upgrade; an expired or revoked
    // token is one likely cause, so the next attempt asks for a fresh one.
    if (!opened) this.#tokenStale = true;
    this.#retry({ reason, code });
  }

  #detach(ws, code, reason) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    if (ws.readyState === this.#WebSocket.CONNECTING || ws.readyState === this.#WebSocket.OPEN) {
      try {
        ws.close(code, reason.slice(0, 100));
      } catch {
        // Already closing.
      }
    }
    if (this.#ws === ws) this.#ws = null;
    for (const timer of [this.#connectTimer, this.#deadTimer, this.#stableTimer]) clearTimeout(timer);
    clearInterval(this.#pingTimer);
    this.#connectTimer = this.#deadTimer = this.#stableTimer = this.#pingTimer = null;
    this.#hello = null;
  }

  #retry({ reason, code }) {
    if (this.#closed) return;
    const { initialMs, maxMs } = this.#options.backoff;
    const ceiling = Math.min(maxMs, initialMs * 2 ** Math.min(this.#attempt, 30));
    const delayMs = Math.floor(Math.random() * ceiling);
    this.#attempt += 1;
    this.#setState('reconnecting', { reason, code, attempt: this.#attempt, delayMs });
    this.#retryTimer = setTimeout(() => this.#connect(), delayMs);
  }

  // --- events -----------------------------------------------------------------

  #setState(state, details) {
    const previous = this.#state;
    this.#state = state;
    this.#emit('state', { state, previous, lastSeq: this.#lastSeq, ...details });
  }

  #emit(event, payload) {
    const handlers = this.#handlers.get(event);
    if (!handlers) return;
    for (const fn of [...handlers]) {
      try {
        fn(payload);
      } catch (error) {
        // An app's handler bug must not break the connection; report it like an uncaught error.
        if (typeof globalThis.reportError === 'function') globalThis.reportError(error);
        else setTimeout(() => {
          throw error;
        });
      }
    }
  }
}

/** The `exp` of a JWT, in ms since the epoch, read without verifying; null when unreadable. */
export function tokenExpiry(token) {
  try {
    const payload = token.split('.')[1];
    const base64 = payload.replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(base64.padEnd(Math.ceil(base64.length / 4) * 4, '=')));
    return Number.isFinite(claims.exp) ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

function expiresWithin(token, marginMs) {
  const expiry = tokenExpiry(token);
  return expiry !== null && expiry - marginMs <= Date.now();
}

// `http(s)://` or `ws(s)://`, default: the page's own origin.
function baseUrl(url) {
  const origin = globalThis.location?.href;
  const parsed = new URL(url ?? '/', origin);
  if (parsed.protocol === 'http:') parsed.protocol = 'ws:';
  else if (parsed.protocol === 'https:') parsed.protocol = 'wss:';
  if (parsed.protocol !== 'ws:' && parsed.protocol !== 'wss:') {
    throw new TypeError(`Herald: url must be http(s) or ws(s), not ${parsed.protocol}`);
  }
  return `${parsed.origin}${parsed.pathname.replace(/\/+$/, '')}`;
}
