// One chat's WebSocket stream: resume from the last rendered seq, heartbeat watchdog, backoff.

import { CLOSE, ERROR } from "./codes.js";

const MAX_BACKOFF_MS = 10_000;
const POLICY_VIOLATION = 1008; // the standard close code a proxy may use to refuse a socket
// Close codes after which retrying cannot help (the page asks the user instead).
const FATAL_CLOSE = new Map([
  [POLICY_VIOLATION, "unauthorized"],
  [CLOSE.BAD_REQUEST, "bad_request"],
  [CLOSE.UNAUTHORIZED, "unauthorized"],
  [CLOSE.FORBIDDEN, "forbidden"],
  [CLOSE.UNKNOWN_CHAT, "not_found"],
]);
const FATAL_ERROR_CODES = new Map([
  [ERROR.UNAUTHORIZED, "unauthorized"],
  [ERROR.FORBIDDEN, "forbidden"],
  [ERROR.NOT_FOUND, "not_found"],
  [ERROR.UNKNOWN_CHAT, "not_found"],
  [ERROR.BAD_REQUEST, "bad_request"],
]);
// Refused handshakes in a row (the socket never opened) after which the page polls REST instead.
const REFUSALS_BEFORE_POLLING = 2;
const POLL_MS = 2000;
// While polling, try the socket again every this many polls (a proxy or server may come round).
const POLLS_PER_SOCKET_TRY = 8;
// Offered first so the server can answer with it instead of echoing the token back.
const PROTOCOL = "mozaiks.v1";

/** The ws(s):// URL of a chat's stream, resuming after `after`. */
export function streamUrl(chatId, after) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}/ws/chats/${encodeURIComponent(chatId)}?after=${after}`;
}

/**
 * A self-healing connection to `/ws/chats/{id}`.
 *
 * States: connecting → catching-up (socket open, replay running) → live (after `replay.done`);
 * reconnecting (waiting for the next try); polling (the socket was refused twice in a row: records
 * come from the REST log every 2 s, and the socket is tried again now and then); closed. A socket that stays silent longer than twice the
 * heartbeat interval is treated as dropped: a stalled network keeps the socket "open" forever.
 */
export class ChatStream {
  #ws = null;
  #generation = 0;
  #attempt = 0;
  #watchdog = 0;
  #retryTimer = 0;
  #closed = false;
  #lastErrorCode = null;
  #opened = false;
  #refused = 0;
  #polling = false;
  #pollTimer = 0;
  #polls = 0;

  /**
   * @param {object} opts
   * @param {string} opts.chatId
   * @param {() => number} opts.after  last seq the page rendered (asked at every (re)connect)
   * @param {number} opts.heartbeatS  server heartbeat interval in seconds
   * @param {() => string} opts.token  bearer token, or "" in local mode
   * @param {(record: object, seq: number) => void} opts.onEvent
   * @param {(lastSeq: number) => void} opts.onReplayDone
   * @param {(code: string, message: string) => void} opts.onError
   * @param {(state: string, detail: object) => void} opts.onState
   * @param {(reason: string) => void} opts.onFatal
   * @param {() => Promise<string|null>} [opts.probe]  after a failed handshake: a fatal reason or null
   * @param {(after: number) => Promise<object[]>} [opts.poll]  the visible records after a seq (REST)
   */
  constructor(opts) {
    this.opts = opts;
    this.state = "idle";
    this.handleOnline = () => this.reconnectNow();
  }

  start() {
    window.addEventListener("online", this.handleOnline);
    this.#connect();
  }

  /** Stop for good (another chat opened, or the page asked for a token). */
  close() {
    this.#closed = true;
    window.removeEventListener("online", this.handleOnline);
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#pollTimer);
    this.#polling = false;
    this.#drop("closed by the page");
    this.#setState("closed");
  }

  /** Send a client frame; false when the socket is not open (the caller tells the user). */
  send(frame) {
    const ws = this.#ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  get isOpen() {
    return this.#ws !== null && this.#ws.readyState === WebSocket.OPEN;
  }

  /** Skip the backoff wait (the browser says the network is back, or the user asked). */
  reconnectNow() {
    if (this.#closed || this.state !== "reconnecting") return;
    clearTimeout(this.#retryTimer);
    this.#connect();
  }

  #setState(state, detail = {}) {
    this.state = state;
    this.opts.onState(state, detail);
  }

  #connect() {
    if (this.#closed) return;
    const generation = ++this.#generation;
    this.#opened = false;
    this.#lastErrorCode = null;
    // While polling, a quiet background try: the page keeps saying it polls until the socket opens.
    if (!this.#polling) this.#setState(this.#attempt === 0 ? "connecting" : "reconnecting", { attempt: this.#attempt });
    const token = this.opts.token();
    let ws;
    try {
      const protocols = token ? [PROTOCOL, `bearer.${token}`] : [PROTOCOL];
      ws = new WebSocket(streamUrl(this.opts.chatId, this.opts.after()), protocols);
    } catch (err) {
      this.#lost(1006, String(err));
      return;
    }
    this.#ws = ws;
    this.#arm(generation);
    ws.onopen = () => {
      if (generation !== this.#generation) return;
      this.#opened = true;
      this.#refused = 0;
      if (this.#polling) {
        this.#polling = false;
        clearTimeout(this.#pollTimer);
      }
      this.#arm(generation);
      this.#setState("catching-up");
    };
    ws.onmessage = (message) => {
      if (generation !== this.#generation) return;
      this.#arm(generation);
      this.#frame(message.data);
    };
    ws.onclose = (event) => {
      if (generation !== this.#generation) return;
      this.#lost(event.code, event.reason);
    };
    ws.onerror = () => {
      // A close event always follows; reconnection is handled there.
    };
  }

  #frame(raw) {
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch {
      this.opts.onError("bad_frame", "The server sent a frame that is not JSON; it was ignored.");
      return;
    }
    switch (frame.type) {
      case "event": {
        const record = frame.event || {};
        const seq = Number(frame.seq ?? record.seq);
        if (Number.isFinite(seq)) this.opts.onEvent({ ...record, seq }, seq);
        break;
      }
      case "replay.done":
        this.#attempt = 0;
        this.opts.onReplayDone(Number(frame.last_seq) || 0);
        this.#setState("live");
        break;
      case "heartbeat":
        this.send({ type: "pong" });
        break;
      case "error":
        this.#lastErrorCode = String(frame.code ?? "");
        this.opts.onError(String(frame.code ?? "error"), String(frame.message ?? "Unknown error"));
        break;
      default:
        // Unknown frame types are ignored so a newer server does not break this page.
        break;
    }
  }

  /** The socket is refused: follow the chat through the REST log instead, and say so. */
  #startPolling(reason) {
    if (!this.#polling) {
      this.#polling = true;
      this.#polls = 0;
      this.#setState("polling", { reason });
      this.#poll();
      return;
    }
    this.#pollTimer = setTimeout(() => this.#poll(), POLL_MS);
  }

  async #poll() {
    if (this.#closed || !this.#polling) return;
    try {
      const records = await this.opts.poll(this.opts.after());
      if (this.#closed || !this.#polling) return;
      for (const record of records) {
        const seq = Number(record.seq);
        if (Number.isFinite(seq)) this.opts.onEvent({ ...record, seq }, seq);
      }
      if (records.length) this.opts.onReplayDone(this.opts.after());
    } catch {
      // The runtime is unreachable right now: the next poll tries again.
    }
    if (this.#closed || !this.#polling) return;
    this.#polls++;
    if (this.#polls % POLLS_PER_SOCKET_TRY === 0) this.#connect();
    else this.#pollTimer = setTimeout(() => this.#poll(), POLL_MS);
  }

  /** (Re)start the silence watchdog: twice the heartbeat interval without any frame means dropped. */
  #arm(generation) {
    clearTimeout(this.#watchdog);
    const ms = Math.max(1, this.opts.heartbeatS) * 2000;
    this.#watchdog = setTimeout(() => {
      if (generation !== this.#generation) return;
      this.#lost(CLOSE.HEARTBEAT, `no frame for ${ms / 1000} s`);
    }, ms);
  }

  #drop(reason) {
    clearTimeout(this.#watchdog);
    const ws = this.#ws;
    this.#ws = null;
    this.#generation++;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(CLOSE.HEARTBEAT, reason.slice(0, 100));
      } catch {
        // Closing a socket that never opened can throw; it is discarded either way.
      }
    }
  }

  async #lost(code, reason) {
    const opened = this.#opened;
    const errorCode = this.#lastErrorCode;
    this.#drop(reason || `closed (${code})`);
    if (this.#closed) return;
    let fatal = FATAL_CLOSE.get(code) || FATAL_ERROR_CODES.get(errorCode) || null;
    if (!fatal && !opened && this.opts.probe) {
      // A refused handshake looks like a network error (1006); REST tells auth and not-found apart.
      const generation = this.#generation;
      fatal = await this.opts.probe().catch(() => null);
      // Closed, or reconnected by reconnectNow() while the probe ran: this loss is handled.
      if (this.#closed || generation !== this.#generation) return;
    }
    if (fatal) {
      this.#closed = true;
      window.removeEventListener("online", this.handleOnline);
      this.#setState("closed", { reason: fatal });
      this.opts.onFatal(fatal);
      return;
    }
    this.#refused = opened ? 0 : this.#refused + 1;
    if (this.opts.poll && (this.#polling || this.#refused >= REFUSALS_BEFORE_POLLING)) {
      this.#startPolling(reason);
      return;
    }
    const base = this.#attempt === 0 ? 300 : Math.min(MAX_BACKOFF_MS, 500 * 2 ** this.#attempt);
    const delay = Math.round(base * (0.75 + Math.random() * 0.5));
    this.#attempt++;
    this.#setState("reconnecting", { attempt: this.#attempt, retryAt: Date.now() + delay, reason });
    this.#retryTimer = setTimeout(() => this.#connect(), delay);
  }
}
