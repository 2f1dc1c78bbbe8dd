// Types for herald.js, Herald's browser client.

export interface HeraldOptions {
  /** The user to subscribe as (1 to 128 bytes of `A-Z a-z 0-9 . _ : @ -`). */
  user: string;
  /** Herald's base URL, http(s):// or ws(s)://. Default: the page's origin. */
  url?: string;
  /** A subscriber token (JWT). Omit against a server with `auth.insecure = true`. */
  token?: string;
  /**
   * Called for a token before the first connect when `token` is not given, and
   * again before a reconnect when the token expired or the upgrade was refused.
   */
  getToken?: () => string | Promise<string>;
  /** Resume after this seq (e.g. one the app kept from an earlier page). */
  since?: number;
  backoff?: {
    /** The first retry waits up to this long. Default 500. */
    initialMs?: number;
    /** No retry waits longer. Default 30000. */
    maxMs?: number;
    /** A connection open this long resets the backoff. Default 10000. */
    stableMs?: number;
  };
  /** Overrides the heartbeat the server announces in `hello`. */
  heartbeat?: {
    /** Send `{"type":"ping"}` this often. */
    intervalMs?: number;
    /** Declare the socket dead when nothing arrives this long after a ping. */
    timeoutMs?: number;
  };
  /** From starting a socket to receiving `hello`. Default 15000. */
  connectTimeoutMs?: number;
  /** A token expiring sooner than this is refreshed before use. Default 1000. */
  tokenMarginMs?: number;
  /** A WebSocket implementation, where there is no global one. */
  WebSocket?: typeof WebSocket;
}

export interface HelloFrame {
  type: 'hello';
  session: string;
  user: string;
  /** The user's latest seq when the session started. */
  seq: number;
  /** The oldest seq the server still stores for the user. */
  first_seq: number;
  /** Only on a resume: false when some notifications after `since` were already dropped. */
  recovered?: boolean;
  heartbeat: { interval_ms: number; timeout_ms: number };
}

export interface HeraldNotification<D = unknown> {
  type: 'notification';
  id: string;
  seq: number;
  event?: string;
  data: D;
  ts: string;
}

export interface HeraldBroadcast<D = unknown> {
  type: 'broadcast';
  id: string;
  event?: string;
  data: D;
  ts: string;
}

export type HeraldState = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface StateChange {
  state: HeraldState;
  previous: HeraldState;
  lastSeq: number | null;
  /** Why the socket went away (`closed`, `upgrade_failed`, `heartbeat_timeout`, `connect_timeout`, …). */
  reason?: string;
  /** The close code, when the socket was closed. */
  code?: number;
  /** Retries since the last stable connection. */
  attempt?: number;
  /** With `reconnecting`: how long until the next attempt. */
  delayMs?: number;
  /** With `open`. */
  session?: string;
  hello?: HelloFrame;
}

/** Notifications the app will never receive. */
export interface Gap {
  /**
   * `retention`: the server no longer stores `from..=to`.
   * `reset`: the server's history was replaced; seqs start over from `firstSeq`.
   * `missing`: a seq was skipped (should not happen; reported rather than hidden).
   */
  reason: 'retention' | 'reset' | 'missing';
  since: number;
  from?: number;
  to?: number;
  seq?: number;
  firstSeq?: number;
}

export interface HeraldError {
  /** A server `error` frame's code, or `token_unavailable`, `bad_frame`, `bad_url`. */
  code: string;
  message: string;
  error?: unknown;
}

export interface HeraldEvents {
  notification: HeraldNotification;
  broadcast: HeraldBroadcast;
  state: StateChange;
  gap: Gap;
  error: HeraldError;
}

export class Herald {
  constructor(options: HeraldOptions);
  /** The highest seq delivered (or announced by the first `hello`); null before. */
  readonly lastSeq: number | null;
  readonly state: HeraldState;
  /** The current session's id, while open. */
  readonly session: string | null;
  /** Answers a function that removes the handler. */
  on<E extends keyof HeraldEvents>(event: E, fn: (payload: HeraldEvents[E]) => void): () => void;
  off<E extends keyof HeraldEvents>(event: E, fn: (payload: HeraldEvents[E]) => void): void;
  /** Closes for good: no reconnect, no more events. */
  close(): void;
}

/** A JWT's `exp` in ms since the epoch, read without verifying; null when unreadable. */
export function tokenExpiry(token: string): number | null;
