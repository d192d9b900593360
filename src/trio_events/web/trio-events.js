/**
 * trio-events.js: a dependency-free browser client for the trio-events WebSocket protocol v1.
 *
 *     import { connect } from "/trio-events.js";
 *     const conn = connect("ws://127.0.0.1:8080/v1/streams/conv-1", {
 *       onEvent: (event) => console.log(event.id, event.type, event.payload),
 *     });
 *     const id = await conn.publish({ type: "chat.message", source: "user", payload: { content: "hi" } });
 *
 * It follows the resume procedure of docs/protocol.md, like the Python client
 * (trio_events.wire.client): after a drop it waits an exponential backoff with jitter and
 * reconnects with after=lastId, so every event is delivered once, in order, across reconnects.
 * A different epoch on reconnect (or a cursor ahead of the head) stops the connection: ids from
 * two histories are never mixed. A publish is answered by the server's ack and is never re-sent.
 *
 * @module trio-events
 */

/** Close codes the server uses (docs/protocol.md, "Close codes"). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  POLICY: 1008,
  TOO_BIG: 1009,
  INTERNAL: 1011,
  TRY_AGAIN_LATER: 1013,
  SLOW_CONSUMER: 4008,
});

const STREAM_ID = /^[A-Za-z0-9._-]{1,128}$/;
const TOKEN = /^[A-Za-z0-9._~+/-]+=*$/;
const MANAGED = ["after", "latest_event_id", "token"];
const FILTER_PARAMS = ["types", "source", "exclude_hidden", "q"];
const SOURCES = ["user", "agent", "environment"];
const BOOLEANS = ["true", "false", "1", "0"];
/** The longest delay setTimeout honours (2^31 - 1 ms); a longer one fires at once. */
const MAX_TIMEOUT_MS = 2 ** 31 - 1;
/** Failures in a row before any hello after which onError reports `handshake_refused`. */
const REFUSED_REPORT_AFTER = 5;
/** A connection open this long (ms) after its hello ends a run of failed attempts. */
const ESTABLISHED_MS = 10000;

/**
 * An error of this client. `code` says which kind:
 * - a server error code (`bad_request`, `unauthorized`, `forbidden`, `not_found`, `too_large`,
 *   `rate_limited`, `internal`): the server's `error` answer; `message` is the server's;
 * - `token_refused`: the server refused the token (close 1008): get a valid token, do not retry;
 *   a close 1008 after `rate_limited` is final with that code instead (too many pings or
 *   refused messages: fix what was refused before connecting again);
 * - `epoch_changed`: the stream's history was reset: discard stored events, connect with after=-1;
 * - `publish_outcome_unknown`: the connection dropped after a publish was sent and before its
 *   answer; it may or may not be stored, and it was not re-sent;
 * - `not_connected`: nothing was sent (no connection in time, or the connection is closed);
 * - `reconnect_failed`: `reconnect.maxAttempts` attempts in a row failed;
 * - `handshake_refused`: (reported by onError, not final) the server refused the connection
 *   several times in a row before any hello: check the URL, stream id, filters and token;
 * - `protocol`: the server sent something this client cannot read.
 */
export class TrioEventsError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{req?: string|number|null, serverCode?: string}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message);
    this.name = "TrioEventsError";
    /** @type {string} */
    this.code = code;
    /** @type {string|number|null} */
    this.req = extra.req ?? null;
    /** The server's error code, for `token_refused` (`unauthorized` or `forbidden`). */
    this.serverCode = extra.serverCode ?? null;
  }
}

/**
 * @typedef {object} TrioEvent
 * @property {number} id
 * @property {string} timestamp ISO 8601, UTC
 * @property {"agent"|"user"|"environment"} source
 * @property {string} type
 * @property {number|null} cause
 * @property {boolean} hidden
 * @property {Record<string, unknown>} payload
 */

/**
 * @typedef {object} NewEvent What `publish` takes; the server assigns id and timestamp.
 * @property {string} type
 * @property {"agent"|"user"|"environment"} source
 * @property {Record<string, unknown>} payload a JSON object
 * @property {number|null} [cause]
 * @property {boolean} [hidden]
 */

/**
 * @typedef {"connecting"|"open"|"reconnecting"|"closed"} State
 */

/**
 * @typedef {object} ReconnectOptions
 * @property {boolean} [enabled=true] reconnect after a drop at all
 * @property {number} [maxAttempts=Infinity] failed attempts in a row before giving up
 *   (the first connection included: 0 makes the first failure final)
 * @property {number} [baseMs=250] the first delay
 * @property {number} [capMs=10000] the longest delay
 * @property {number} [jitter=0.5] the random fraction of each delay (0 to 1)
 */

/**
 * @typedef {object} ConnectOptions
 * @property {number|"latest"} [after=-1] the last id you already have; -1: all history;
 *   "latest": new events only
 * @property {string} [token] sent as ?token= (a browser cannot send Authorization); never logged
 * @property {Record<string, string|boolean|string[]>} [params] server-side filter parameters:
 *   types, source, exclude_hidden, q
 * @property {ReconnectOptions} [reconnect]
 * @property {number} [publishTimeoutMs=30000] how long a publish may take, waiting included
 * @property {number|null} [pingIntervalMs=20000] after this long without a frame from the
 *   server, send a `ping` (null: never); a server or network gone without closing the TCP
 *   connection sends nothing, and the browser would wait for it forever
 * @property {number} [pingTimeoutMs=20000] no frame within this long after the ping: the
 *   connection is taken for dead, dropped and resumed (`onClose` reports 1006)
 * @property {(hello: object) => void} [onOpen] each connection's `hello`
 * @property {(info: {code: number, reason: string, willReconnect: boolean}) => void} [onClose]
 * @property {(message: object) => void} [onMessage] every server message, parsed
 * @property {(event: TrioEvent) => void} [onEvent] each event once, in id order
 * @property {(events: TrioEvent[]) => void} [onEvents] each frame's new events, in id order
 * @property {(error: TrioEventsError) => void} [onError] errors not tied to a publish
 * @property {(state: State, info: {attempt: number, delayMs?: number}) => void} [onState]
 * @property {(gap: {from: number, to: number}) => void} [onGap] events gone (retention)
 * @property {(change: {old: string, new: string|null, lastId: number}) => void} [onEpochChange]
 * @property {(id: number) => void} [onCaughtUp] history replayed up to this id; live from here
 */

/**
 * Follow one stream: connect, replay from `after`, then receive live events.
 *
 * @param {string} url `ws://HOST:PORT/v1/streams/{stream_id}` (or wss://); no query string:
 *   pass filters as `params`, and `after` and `token` as options
 * @param {ConnectOptions} [options]
 * @returns {Connection}
 * @throws {TypeError} for a bad url, after, token or params (the message says what to fix)
 */
export function connect(url, options = {}) {
  return new Connection(url, options);
}

/** The delay before attempt `attempt` (0-based), given `rand` in [0, 1). */
export function backoffDelay(attempt, rand, { baseMs = 250, capMs = 10000, jitter = 0.5 } = {}) {
  const exponential = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 64));
  return exponential * (1 - jitter * rand);
}

/** A followed stream; made by `connect`. */
export class Connection {
  /**
   * @param {string} url
   * @param {ConnectOptions} options
   */
  constructor(url, options) {
    const { base, filtered } = checkUrl(url, options.params ?? {});
    const after = options.after ?? -1;
    if (after !== "latest" && !(Number.isSafeInteger(after) && after >= -1)) {
      throw new TypeError(`after is -1, "latest" or an event id >= 0, not ${String(after)}`);
    }
    if (options.token != null && (typeof options.token !== "string" || !TOKEN.test(options.token))) {
      // The token itself is never shown.
      throw new TypeError("token must be a non-empty RFC 6750 token (A-Z a-z 0-9 -._~+/ then =)");
    }
    /** @private */ this._base = base;
    /** @private */ this._filtered = filtered;
    /** @private */ this._token = options.token || null;
    /** @private */ this._after = after;
    /** @private */ this._opts = options;
    /** @private */ this._reconnect = { enabled: true, maxAttempts: Infinity, baseMs: 250,
      capMs: 10000, jitter: 0.5, ...(options.reconnect ?? {}) };
    const publishTimeoutMs = options.publishTimeoutMs ?? 30000;
    if (typeof publishTimeoutMs !== "number" || Number.isNaN(publishTimeoutMs) || publishTimeoutMs < 0) {
      throw new TypeError(`publishTimeoutMs is a number of ms >= 0, not ${String(publishTimeoutMs)}`);
    }
    // setTimeout fires at once for more than 2^31 - 1 ms (Infinity included): clamp (~24.8 days).
    /** @private */ this._publishTimeoutMs = Math.min(publishTimeoutMs, MAX_TIMEOUT_MS);
    const pingIntervalMs = options.pingIntervalMs === undefined ? 20000 : options.pingIntervalMs;
    const pingTimeoutMs = options.pingTimeoutMs ?? 20000;
    for (const [name, ms] of [["pingIntervalMs", pingIntervalMs], ["pingTimeoutMs", pingTimeoutMs]]) {
      if (ms !== null && !(typeof ms === "number" && ms > 0)) {
        throw new TypeError(`${name} is a number of ms > 0${name === "pingIntervalMs" ? " or null" : ""}, not ${String(ms)}`);
      }
    }
    /** @private */ this._pingIntervalMs = pingIntervalMs === null ? null : Math.min(pingIntervalMs, MAX_TIMEOUT_MS);
    /** @private */ this._pingTimeoutMs = Math.min(pingTimeoutMs, MAX_TIMEOUT_MS);
    /** @private When the open connection last received a frame (ms, Date.now). */
    this._lastHeard = 0;
    /** @private */ this._pingTimer = null;
    /** @private */ this._closedByUser = false;
    /** @private Failed connections in a row without a hello (for `handshake_refused`). */
    this._refusedInARow = 0;
    /** @private Failed attempts in a row (for `reconnect.maxAttempts`). */
    this._failures = 0;
    /** @private Whether this connection delivered anything: events, a gap, caught_up, an ack. */
    this._progressed = false;
    /** @private When this connection got its hello (Date.now()), or null. */
    this._openedAt = null;
    /** The stream id, from the url. */
    this.streamId = decodeURIComponent(base.slice(base.lastIndexOf("/") + 1));
    /** The epoch of the stream's history, from the first `hello` (null before). */
    this.epoch = null;
    /** The last id accounted for (received, or reported gone or filtered); resumes use it. */
    this.lastId = -1;
    /** The highest id known to exist: from `hello.latest_id`, events and acks. */
    this.headId = -1;
    /** @type {State} */
    this.state = "connecting";
    /** The reconnect attempt under way or waited for (1, 2, ...); 0 while connected. */
    this.attempt = 0;
    /** Connections that reached `hello` (1 + the reconnects). */
    this.connections = 0;
    /** Why the connection ended, once `state` is "closed" (null: it ended normally). */
    this.error = null;
    /** @private @type {WebSocket|null} */ this._ws = null;
    /** @private */ this._helloSeen = false;
    /** @private */ this._refusal = null; // an error before hello, for the close that follows
    /** @private */ this._reported = null; // the last error already given to onError
    /** @private */ this._timer = null;
    /** @private */ this._nextReq = 0;
    /** @private @type {Map<string, {resolve: Function, reject: Function, timer: any}>} */
    this._pending = new Map();
    /** @private @type {Array<{data: string, req: string}>} */ this._queue = [];
    this._setState("connecting");
    this._open();
  }

  /**
   * Publish an event; resolves with its id once the server stored it (its `ack`).
   *
   * While reconnecting it waits for the connection (up to `publishTimeoutMs` in all). Rejects
   * with a TrioEventsError: the server's code (`bad_request`, `forbidden`, `rate_limited`...)
   * for an `error` answer, `publish_outcome_unknown` when the connection dropped (or the time
   * ran out) after sending and before the answer (it is never re-sent), `not_connected` when
   * nothing was sent.
   *
   * @param {NewEvent} event
   * @returns {Promise<number>}
   */
  publish(event) {
    if (event === null || typeof event !== "object" || Array.isArray(event)) {
      return Promise.reject(new TypeError("publish takes an object {type, source, payload}"));
    }
    const req = `p${++this._nextReq}`;
    const data = JSON.stringify({ op: "publish", req, event });
    if (this.state === "closed") {
      return Promise.reject(this._notConnected());
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const queued = this._queue.findIndex((q) => q.req === req);
        if (queued >= 0) {
          this._queue.splice(queued, 1);
          this._pending.delete(req);
          reject(new TrioEventsError("not_connected",
            `not connected within ${this._publishTimeoutMs} ms; nothing was sent`, { req }));
          return;
        }
        this._settle(req, null, new TrioEventsError("publish_outcome_unknown",
          `no answer to the publish within ${this._publishTimeoutMs} ms: it may or may not ` +
          "have been stored (it was not re-sent)", { req }));
      }, this._publishTimeoutMs);
      this._pending.set(req, { resolve, reject, timer });
      if (this.state === "open" && this._ws) this._ws.send(data);
      else this._queue.push({ data, req });
    });
  }

  /**
   * Send one raw message (a string, or an object sent as JSON) on the open connection.
   * @param {string|object} raw
   * @throws {TrioEventsError} `not_connected` when no connection is open
   */
  sendMessage(raw) {
    if (this.state !== "open" || !this._ws) {
      throw new TrioEventsError("not_connected", `cannot send: the connection is ${this.state}`);
    }
    this._ws.send(typeof raw === "string" ? raw : JSON.stringify(raw));
  }

  /** Close for good: no reconnect. Publishes not yet answered are rejected. */
  disconnect() {
    this._closedByUser = true;
    if (this.state === "closed") return;
    this._finish(null, CloseCode.NORMAL, "disconnect() called");
  }

  // --- internals -------------------------------------------------------------------------------

  /** @private True once closed (by disconnect() or for good): stop after any user callback. */
  _ended() {
    return this._closedByUser || this.state === "closed";
  }

  /** @private */
  _url() {
    const after = this.epoch === null ? this._after : this.lastId;
    const query = new URLSearchParams({ after: String(after) });
    for (const [name, value] of Object.entries(this._opts.params ?? {})) {
      if (value === undefined || value === null || value === "") continue;
      query.set(name, Array.isArray(value) ? value.join(",") : String(value));
    }
    if (this._token) query.set("token", this._token);
    // URLSearchParams writes a space as "+", which the server reads as a space; a literal "+"
    // (possible in a token) is written as %2B: both are what the server expects.
    return `${this._base}?${query}`;
  }

  /** @private */
  _open() {
    if (this._ended()) return;
    this._helloSeen = false;
    this._refusal = null;
    this._progressed = false;
    this._openedAt = null;
    let ws;
    try {
      ws = new WebSocket(this._url());
    } catch (err) {
      this._finish(new TrioEventsError("protocol", `cannot open the WebSocket: ${err.message}`));
      return;
    }
    this._ws = ws;
    ws.onmessage = (msg) => { if (this._ws === ws) this._onFrame(msg.data); };
    ws.onclose = (ev) => { if (this._ws === ws) this._onClose(ev.code, ev.reason); };
    // A failed connection is also reported by onclose (1006), which decides what to do.
    ws.onerror = () => {};
  }

  /** @private */
  _setState(state, info = {}) {
    this.state = state;
    this._opts.onState?.(state, { attempt: this.attempt, ...info });
  }

  /** @private */
  _onFrame(data) {
    this._lastHeard = Date.now();
    let msg;
    try {
      msg = JSON.parse(data);
      if (msg === null || typeof msg !== "object" || typeof msg.op !== "string") throw new Error();
    } catch {
      this._drop("the server sent a frame that is not a JSON message");
      return;
    }
    this._opts.onMessage?.(msg);
    if (this._ended()) return;
    if (!this._helloSeen) {
      this._opening(msg);
      return;
    }
    if (msg.op === "events" || msg.op === "gap" || msg.op === "caught_up" || msg.op === "ack") {
      this._progressed = true;
    }
    switch (msg.op) {
      case "events": this._onEvents(msg.events); break;
      case "gap": this._onGap(msg.from, msg.to); break;
      case "caught_up":
        this.lastId = Math.max(this.lastId, msg.id);
        this.headId = Math.max(this.headId, msg.id);
        this._opts.onCaughtUp?.(msg.id);
        break;
      case "ack": this._settle(String(msg.req), msg.id, null); break;
      case "error": {
        const err = new TrioEventsError(msg.code, msg.message, { req: msg.req ?? null });
        if (msg.req != null && this._pending.has(String(msg.req))) {
          this._settle(String(msg.req), null, err);
          this._refusal = err; // if a close 1008 follows, this is why (`rate_limited`)
        } else {
          // An error the server sends before closing (e.g. an expired token); the close decides.
          this._refusal = err;
          this._reported = err;
          this._opts.onError?.(err);
        }
        break;
      }
      case "pong": break;
      default: break; // forward compatibility: unknown messages are ignored
    }
  }

  /** @private */
  _opening(msg) {
    if (msg.op === "error") {
      if (this.epoch !== null && msg.code === "bad_request") {
        // "cursor after=N is ahead of the stream": an id from another history.
        this._epochChanged(null);
        return;
      }
      // A refused token (then 1008) or a bad request (then 1000): the close reports it.
      this._refusal = new TrioEventsError(msg.code, msg.message);
      return;
    }
    if (msg.op !== "hello") {
      this._drop(`expected hello first, got ${msg.op}`);
      return;
    }
    if (this.epoch !== null && msg.epoch !== this.epoch) {
      this._epochChanged(msg.epoch);
      return;
    }
    if (this.epoch === null) {
      this.epoch = msg.epoch;
      this.lastId = msg.after;
    }
    this._helloSeen = true;
    this._openedAt = Date.now();
    this._refusedInARow = 0;
    this.connections += 1;
    this.attempt = 0;
    this.headId = Math.max(this.headId, msg.latest_id);
    this._setState("open");
    if (this._ended() || !this._ws) return;
    this._keepAlive(this._ws, this._pingIntervalMs);
    for (const { data } of this._queue.splice(0)) this._ws.send(data);
    this._opts.onOpen?.(msg);
  }

  /** @private */
  _onEvents(events) {
    const fresh = [];
    for (const event of events) {
      if (event.id <= this.lastId) continue; // the server never sends one; never deliver twice
      if (event.id !== this.lastId + 1 && !this._filtered) {
        // A hole without a gap message: never skip silently.
        this._opts.onGap?.({ from: this.lastId + 1, to: event.id - 1 });
        if (this._ended()) return;
      }
      this.lastId = event.id;
      this.headId = Math.max(this.headId, event.id);
      fresh.push(event);
      this._opts.onEvent?.(event);
      if (this._ended()) return; // disconnect() in onEvent: deliver nothing more
    }
    if (fresh.length) this._opts.onEvents?.(fresh);
  }

  /** @private */
  _onGap(from, to) {
    if (to <= this.lastId) return;
    this._opts.onGap?.({ from: Math.max(from, this.lastId + 1), to });
    this.lastId = to;
    this.headId = Math.max(this.headId, to);
  }

  /** @private */
  _settle(req, id, error) {
    const pending = this._pending.get(req);
    if (!pending) return;
    this._pending.delete(req);
    clearTimeout(pending.timer);
    if (error) pending.reject(error);
    else {
      this.headId = Math.max(this.headId, id);
      pending.resolve(id);
    }
  }

  /** @private Fail every publish sent and not answered (never re-sent). */
  _failSent() {
    const queued = new Set(this._queue.map((q) => q.req));
    for (const req of [...this._pending.keys()]) {
      if (queued.has(req)) continue;
      this._settle(req, null, new TrioEventsError("publish_outcome_unknown",
        "the connection dropped after the publish was sent and before its answer: it may or " +
        "may not have been stored (it was not re-sent)", { req }));
    }
  }

  /** @private */
  _epochChanged(newEpoch) {
    const change = { old: this.epoch, new: newEpoch, lastId: this.lastId };
    const now = newEpoch === null ? "a cursor ahead of its head" : `epoch ${newEpoch}`;
    const err = new TrioEventsError("epoch_changed",
      `the stream's history was reset (epoch ${change.old}, now ${now}); ids after ` +
      `${change.lastId} are from another history. Discard stored events and connect again ` +
      "with after=-1");
    this._opts.onEpochChange?.(change);
    this._finish(err, CloseCode.NORMAL, "epoch changed");
  }

  /**
   * @private Ping `ws` once it has been silent for the ping interval (`delayMs` from now at
   * the earliest); without a frame within the ping timeout, drop it and resume.
   */
  _keepAlive(ws, delayMs) {
    clearTimeout(this._pingTimer);
    this._pingTimer = null;
    if (this._pingIntervalMs === null) return;
    this._pingTimer = setTimeout(() => {
      this._pingTimer = null;
      if (ws !== this._ws || this.state !== "open") return;
      const quietMs = Date.now() - this._lastHeard;
      if (quietMs < this._pingIntervalMs) {
        this._keepAlive(ws, this._pingIntervalMs - quietMs);
        return;
      }
      const sentAt = this._lastHeard;
      ws.send(JSON.stringify({ op: "ping", req: `k${++this._nextReq}` }));
      this._pingTimer = setTimeout(() => {
        this._pingTimer = null;
        if (ws !== this._ws) return;
        if (this._lastHeard !== sentAt) {
          this._keepAlive(ws, this._pingIntervalMs); // it answered (or sent something else)
          return;
        }
        // A dead peer never completes a close handshake: detach the socket and resume now.
        this._ws = null;
        ws.close(CloseCode.NORMAL);
        this._onClose(CloseCode.ABNORMAL, `no answer to a ping within ${this._pingTimeoutMs} ms`, true);
      }, this._pingTimeoutMs);
    }, delayMs);
  }

  /** @private The server broke the protocol: drop this connection and resume. */
  _drop(why) {
    this._opts.onError?.(new TrioEventsError("protocol", why));
    if (this._ended()) return;
    const ws = this._ws;
    this._ws = null;
    ws?.close(CloseCode.NORMAL);
    this._onClose(CloseCode.ABNORMAL, why, true);
  }

  /** @private */
  _onClose(code, reason, detached = false) {
    if (!detached) this._ws = null;
    clearTimeout(this._pingTimer);
    this._pingTimer = null;
    if (this._ended()) return;
    this._failSent();
    const helloSeen = this._helloSeen;
    const refusal = this._refusal;
    if (code === CloseCode.POLICY) {
      const detail = refusal ? refusal.message : reason || "no reason given";
      this._closeNotify(code, reason, false);
      // 1008 after `rate_limited`: too many pings or refused messages, not a token problem.
      this._finish(refusal?.code === "rate_limited" ? refusal
        : new TrioEventsError("token_refused", `token refused: ${detail}`,
          { serverCode: refusal?.code }));
      return;
    }
    if (code === CloseCode.NORMAL && (helloSeen || refusal)) {
      this._closeNotify(code, reason, false);
      this._finish(helloSeen ? null : refusal);
      return;
    }
    // Failed attempts in a row. A connection that delivered something or stayed open for
    // ESTABLISHED_MS ends the run; one that said hello and closed at once (1011: the stream's
    // stored history is damaged, say) is one more failure, so that maxAttempts ends it.
    const established = this._progressed ||
      (this._openedAt !== null && Date.now() - this._openedAt >= ESTABLISHED_MS);
    const failures = established ? 0 : this._failures;
    const { enabled, maxAttempts } = this._reconnect;
    if (!enabled || failures >= maxAttempts) {
      this._closeNotify(code, reason, false);
      const why = `closed with ${code}${reason ? ` (${reason})` : ""}`;
      this._finish(enabled
        ? new TrioEventsError("reconnect_failed", `could not (re)connect to stream ` +
          `${this.streamId}: ${failures + 1} attempt${failures ? "s" : ""} in a row failed; last: ${why}`)
        : new TrioEventsError("not_connected", `the connection was lost (${why}) and ` +
          "reconnect is disabled"));
      return;
    }
    if (!helloSeen) this._refusedInARow += 1;
    this._closeNotify(code, reason, true);
    if (this._ended()) return; // disconnect() in onClose
    if (this._refusedInARow === REFUSED_REPORT_AFTER) {
      // A handshake refused by an HTTP status is only a 1006 to a browser: say so once.
      this._opts.onError?.(new TrioEventsError("handshake_refused",
        `the server refused the connection ${this._refusedInARow} times before hello: check ` +
        "the URL, stream id, filters and token (the server's log, the Python client or " +
        "`trio-events tail` show the HTTP status)"));
      if (this._ended()) return;
    }
    const delayMs = Math.min(backoffDelay(failures, Math.random(), this._reconnect), MAX_TIMEOUT_MS);
    this.attempt = failures + 1;
    this._failures = failures + 1;
    this._setState("reconnecting", { delayMs });
    if (this._ended()) return; // disconnect() in onState
    this._timer = setTimeout(() => {
      this._timer = null;
      if (this._ended()) return;
      this._open();
    }, delayMs);
  }

  /** @private */
  _closeNotify(code, reason, willReconnect) {
    this._opts.onClose?.({ code, reason, willReconnect });
  }

  /** @private The end: no more connections. */
  _finish(error, code = CloseCode.NORMAL, reason = "") {
    if (this.state === "closed") return;
    clearTimeout(this._timer);
    this._timer = null;
    clearTimeout(this._pingTimer);
    this._pingTimer = null;
    const ws = this._ws;
    this._ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(code, reason);
    this._failSent();
    for (const { req } of this._queue.splice(0)) this._settle(req, null, this._notConnected());
    this.error = error;
    this._setState("closed");
    if (error && error !== this._reported) this._opts.onError?.(error); // not twice
  }

  /** @private */
  _notConnected() {
    const why = this.error ? this.error.message : "it was closed";
    return new TrioEventsError("not_connected", `the connection is closed (${why}); nothing was sent`);
  }
}

/**
 * Check `url` and `params`; the base url and whether a filter is set.
 * @param {string} url
 * @param {object} params
 */
function checkUrl(url, params) {
  let parsed;
  try {
    parsed = new URL(url);
  } catch {
    throw new TypeError(`url must be ws://HOST:PORT/v1/streams/{stream_id}, not ${JSON.stringify(url)}`);
  }
  if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
    throw new TypeError(`url must start with ws:// or wss://, not ${parsed.protocol}//`);
  }
  if (parsed.search || parsed.hash) {
    throw new TypeError("url must have no ?query or #fragment: pass after, token and params as options");
  }
  const match = /^\/v1\/streams\/([^/]+)$/.exec(parsed.pathname);
  let streamId = null;
  try {
    streamId = match && decodeURIComponent(match[1]);
  } catch { /* a malformed escape: reported below */ }
  if (!streamId || !STREAM_ID.test(streamId) || streamId === "." || streamId === "..") {
    throw new TypeError("url path must be /v1/streams/{stream_id}, the id 1 to 128 characters " +
      "from A-Z a-z 0-9 . _ -");
  }
  if (params === null || typeof params !== "object") throw new TypeError("params must be an object");
  for (const name of Object.keys(params)) {
    if (MANAGED.includes(name)) {
      throw new TypeError(`do not put ${name} in params: pass it as the ${name === "token" ? "token" : "after"} option`);
    }
    if (!FILTER_PARAMS.includes(name)) {
      throw new TypeError(`unknown parameter ${JSON.stringify(name)}: params may hold ${FILTER_PARAMS.join(", ")}`);
    }
  }
  for (const [name, value] of Object.entries(params)) {
    if (value === undefined || value === null || value === "") continue;
    checkParam(name, value);
  }
  const filtered = Object.values(params).some((v) => v !== undefined && v !== null && v !== "");
  return { base: `${parsed.protocol}//${parsed.host}/v1/streams/${encodeURIComponent(streamId)}`, filtered };
}

/** Check one filter value as the server does (it refuses a bad one before hello). */
function checkParam(name, value) {
  const text = Array.isArray(value) ? value.join(",") : String(value);
  if (name === "source" && !SOURCES.includes(text)) {
    throw new TypeError(`params.source is one of ${SOURCES.join(", ")}, not ${JSON.stringify(text)}`);
  }
  if (name === "exclude_hidden" && !BOOLEANS.includes(text.toLowerCase())) {
    throw new TypeError(`params.exclude_hidden is true or false (or 1 or 0), not ${JSON.stringify(text)}`);
  }
  if (name === "types" && text.split(",").some((t) => t.length === 0 || t.length > 256)) {
    throw new TypeError("params.types is a comma-separated list of type names, each 1 to 256 " +
      `characters, not ${JSON.stringify(text)}`);
  }
}
