// The conversation view: a projection of a chat's visible events onto the DOM, one seq at a time.

import { Marked } from "../vendor/marked.esm.js";
import DOMPurify from "../vendor/purify.es.js";
import { fileChip } from "./files.js";
import { forkOrigin } from "./lineage.js";
import { childCompletedText, childThread } from "./children.js";
import { invalidOutputText, isStructured, structuredCard } from "./structured.js";
import { UiRequests } from "./ui.js";

const TERMINAL = new Set(["run.completed", "run.failed", "run.stopped"]);
// Recorded for audit and metrics; shown only when the user asks for internal events.
const TRACE = new Set(["llm.call", "ag2.event", "context.updated", "output.invalid", "hook.called"]);
// AG2's console prompt for the human ("Replying as user. Provide feedback to chat_manager…"): never shown.
const AG2_PROMPT = /^\s*(Replying as |Provide feedback to |Please give feedback to |Press enter to )/i;
// Handoff targets that mean "back to the person in the chat" or "the end".
const TO_USER = /^(revert to user|user|human|you)$/i;
const TO_END = /^(terminate|terminate chat|end|stop)$/i;

/** A failed run in one sentence a user can act on (the technical error stays folded under it). */
const FAILURE_SENTENCES = {
  model: "The model could not be reached or kept failing, so the agents stopped.",
  tool: "A tool the agents used failed, so the run stopped.",
  storage: "The runtime could not save the conversation, so the run stopped.",
  interrupted: "The run was interrupted: the runtime stopped or restarted while it was working.",
  setup: "The workflow could not be started: its configuration has an error.",
  output: "An agent's replies never matched the form it has to fill in, so the run stopped.",
  hook: "A workflow hook (the workflow's own code) failed, so the run stopped.",
};

function escapeHtml(text) {
  const map = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  return String(text).replace(/[&<>"']/g, (c) => map[c]);
}

const markdown = new Marked({ gfm: true, breaks: true, async: false });
markdown.use({
  renderer: {
    // LLM output is untrusted: an image URL can carry data out, so images become plain links.
    // Raw HTML in agent text is shown as the text it is (an agent may be writing HTML for the user);
    // only Markdown becomes markup. DOMPurify below still cleans what Markdown produces.
    html({ text, block }) {
      return block ? `<pre><code>${escapeHtml(text.replace(/\n+$/, ""))}</code></pre>` : escapeHtml(text);
    },
    image({ href, text }) {
      return `<a href="${escapeHtml(href || "")}">${escapeHtml(`Image: ${text || href || ""}`)}</a>`;
    },
  },
});

const PURIFY = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: [
    "img", "style", "form", "input", "button", "textarea", "select", "option", "iframe", "frame",
    "object", "embed", "video", "audio", "source", "picture", "link", "meta", "base", "svg",
    "math", "template", "dialog",
  ],
  FORBID_ATTR: ["style", "class", "id", "name", "srcset", "action", "formaction", "background", "poster"],
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow ugc");
  }
});

/** Agent text as sanitized Markdown: a DocumentFragment with no script, handler or unsafe URL. */
export function renderMarkdown(text) {
  const source = String(text ?? "");
  if (!DOMPurify.isSupported) {
    const fragment = document.createDocumentFragment();
    fragment.append(el("p", { class: "plain" }, source));
    return fragment;
  }
  return DOMPurify.sanitize(markdown.parse(source), PURIFY);
}

/** Create an element with attributes (values set as attributes, never as HTML) and text children. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** A stable hue for an agent name, so each agent keeps its colour across chats. */
export function agentHue(name) {
  let hash = 0;
  for (const ch of String(name)) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return hash % 360;
}

export function initials(name) {
  const parts = String(name || "?")
    .replace(/([a-z0-9])([A-Z])/g, "$1 $2")
    .split(/[^A-Za-z0-9]+/)
    .filter(Boolean);
  return (parts.length ? parts.slice(0, 2).map((p) => p[0]) : ["?"]).join("").toUpperCase();
}

export function timeEl(ts) {
  const date = ts ? new Date(ts) : null;
  if (!date || Number.isNaN(date.getTime())) return null;
  return el(
    "time",
    { datetime: date.toISOString(), title: date.toLocaleString() },
    date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }),
  );
}

function avatar(name) {
  const node = el("span", { class: "avatar", "aria-hidden": "true" }, initials(name));
  node.style.setProperty("--hue", String(agentHue(name)));
  return node;
}

function prettyJson(text) {
  if (typeof text !== "string") return JSON.stringify(text, null, 2);
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

/** One line summing up a tool call's arguments, e.g. `path: notes/a.md, limit: 3`. */
function argumentsPreview(text) {
  let value;
  try {
    value = typeof text === "string" ? JSON.parse(text) : text;
  } catch {
    return String(text ?? "").slice(0, 80);
  }
  if (!value || typeof value !== "object" || Array.isArray(value)) return JSON.stringify(value ?? "").slice(0, 80);
  const line = Object.entries(value)
    .map(([key, v]) => `${key}: ${typeof v === "string" ? v.replace(/\s+/g, " ") : JSON.stringify(v)}`)
    .join(", ");
  return line.length > 80 ? `${line.slice(0, 79)}…` : line;
}

/**
 * Renders records in seq order, each once. Every rendered event carries data-testid="event",
 * data-seq, data-type and (when it has one) data-agent, so tests can compare it with the log.
 */
export class ChatView {
  /**
   * @param {HTMLElement} root  the <ol> the events go into
   * @param {object} hooks  onStatus(status), onOffline(), onTerminal(record, live),
   *   announce(text), onInputResponse(requestId, text) → boolean, onInputRequested(textarea, live),
   *   onActivity(text|null) ("Writer is working…"), onRetry(text) → boolean, visibleAgents(workflow) → Set|null
   * Set `agentInfo(name) → {role, description}` after reset() to label agents from the workflow.
   */
  constructor(root, hooks) {
    this.root = root;
    this.hooks = hooks;
    this.ui = new UiRequests(root, hooks);
    this.reset(null);
  }

  /**
   * The records worth keeping for a reload: the deltas of a finished message are left out (its
   * `message.agent` holds the whole text), those of a message still streaming stay.
   */
  storableRecords() {
    const finished = new Set(this.records.filter((r) => r.type === "message.agent").map((r) => r.data?.message_id));
    return this.records.filter((r) => r.type !== "message.delta" || !finished.has(r.data?.message_id));
  }

  reset(chatId) {
    this.chatId = chatId;
    this.lastSpeaker = null;
    this.lastAgent = null;
    this.lastContent = null;
    this.agentInfo = () => ({});
    // The agents the workflow shows (a Set), when known: other names are never written on the page.
    this.visibleAgents = null;
    // Who the user is (for "Stopped by you"), set by the page.
    this.me = "local";
    // What the run is doing as far as the user's records tell: null (idle) or {agent|null, streaming}.
    this.activity = null;
    this.lastUserText = null;
    this.retries = [];
    this.lastSeq = 0;
    this.records = [];
    this.turn = null;
    this.calls = new Map();
    this.requests = new Map();
    // message_id -> a message being streamed: {agent, body, text, frame}.
    this.streams = new Map();
    this.status = "unknown";
    this.offline = false;
    this.root.replaceChildren();
    this.ui.reset();
  }

  /** Render one record unless it is hidden or already shown; returns true when rendered. */
  apply(record, live = false) {
    if (!record || record.visible === false) return false;
    const seq = Number(record.seq);
    // Seqs only grow: an equal or lower one was already rendered (replay overlap, stale socket).
    if (!Number.isInteger(seq) || seq <= this.lastSeq) return false;
    this.lastSeq = seq;
    this.records.push(record);
    try {
      this.#render(record, live);
      this.#follow(record);
    } catch (err) {
      console.error("cannot render event", record, err);
      this.root.append(this.#marker(record, `Event ${record.type} #${seq} could not be displayed.`, "marker--error"));
    }
    return true;
  }

  #setStatus(status) {
    if (status === this.status) return;
    this.status = status;
    if (TERMINAL.has(`run.${status}`)) {
      for (const request of this.requests.values()) {
        if (!request.answered) this.#closeRequest(request, "The run ended before this was answered.");
      }
    }
    this.hooks.onStatus(status);
  }

  #setOffline(flag) {
    if (flag && !this.offline) {
      this.offline = true;
      this.hooks.onOffline();
    }
  }

  #base(tag, record, cls) {
    const node = el(tag, {
      class: cls,
      "data-testid": "event",
      "data-seq": record.seq,
      "data-type": record.type,
      "data-agent": record.agent || null,
    });
    return node;
  }

  #marker(record, text, cls = "") {
    const node = this.#base("li", record, `marker ${cls}`.trim());
    node.append(el("span", { class: "marker__text" }, text));
    const time = timeEl(record.ts);
    if (time) node.append(time);
    return node;
  }

  #head(name, { role, ts, note } = {}) {
    // The workflow's own word for the agent (its type, e.g. "orchestrator") beats the chat role.
    const known = this.agentInfo(name);
    const head = el("div", { class: "msg__head" }, avatar(name),
      el("span", { class: "msg__agent", title: known.description || null }, name));
    role = known.role || role;
    if (role && role !== "user") head.append(el("span", { class: "msg__role" }, role));
    if (note) head.append(el("span", { class: "msg__note" }, note));
    const time = timeEl(ts);
    if (time) head.append(time);
    return head;
  }

  #render(record, live) {
    const data = record.data || {};
    const agent = record.agent || null;
    // A turn card stays open across its agent's tool calls, own speaker re-selection and trace events.
    const keepsTurn = TRACE.has(record.type)
      || ["tool.called", "tool.result", "message.agent", "message.delta"].includes(record.type)
      || (record.type === "speaker.selected" && data.speaker === this.turn?.agent);
    if (!keepsTurn) this.turn = null;
    switch (record.type) {
      case "chat.created": {
        // Which agents the chat may name: known from its workflow, live and on a reload alike.
        if (!this.visibleAgents && record.workflow) this.visibleAgents = this.hooks.visibleAgents?.(record.workflow) || null;
        const node = this.#marker(record, `Chat started${record.workflow ? ` · ${record.workflow}` : ""}`);
        if (data.offline) node.append(el("span", { class: "badge badge--offline" }, "offline fixtures"));
        const context = data.context && Object.keys(data.context).length ? data.context : null;
        if (context) {
          node.append(
            el("details", { class: "marker__details" }, el("summary", {}, "Context"),
              el("pre", {}, JSON.stringify(context, null, 2))),
          );
        }
        if (data.forked_from) node.append(forkOrigin(data.forked_from));
        this.root.append(node);
        this.#setOffline(Boolean(data.offline));
        // A fork waits for its next message (its copied messages are no run).
        if (data.forked_from) this.#setStatus("forked");
        break;
      }
      case "run.started": {
        // A new run: an earlier failure's Retry has been answered (by it or by a new message).
        for (const button of this.retries) button.remove();
        this.retries = [];
        const parts = ["Run started"];
        if (data.pattern) parts.push(`${data.pattern} pattern`);
        if (data.max_turns) parts.push(`up to ${data.max_turns} turns`);
        if (data.model) parts.push(data.model);
        const node = this.#marker(record, parts.join(" · "), "marker--run");
        if (data.offline) node.append(el("span", { class: "badge badge--offline" }, "offline fixtures"));
        this.root.append(node);
        this.#setOffline(Boolean(data.offline));
        this.#setStatus("running");
        break;
      }
      case "message.user": {
        this.lastUserText = String(data.content ?? "");
        const node = this.#base("li", record, "msg msg--user");
        node.append(this.#head("You", { ts: record.ts }), el("div", { class: "msg__body plain" }, data.content ?? ""));
        this.root.append(node);
        if (this.status !== "running" && data.origin !== "fork") this.#setStatus("running");
        break;
      }
      case "message.delta":
        this.#delta(record, data, agent);
        break;
      case "message.agent": {
        const name = agent || "Agent";
        const content = String(data.content ?? "");
        const streamed = data.message_id ? this.streams.get(data.message_id) : null;
        if (streamed) {
          this.#finishStream(streamed, record, content);
          this.lastAgent = agent;
          this.lastContent = content;
          if (live) this.hooks.announce(`${name}: ${content.slice(0, 200)}`);
          break;
        }
        // The text goes into the agent's open turn when that turn so far only called tools, above
        // the folded tools: the message reads first, what the agent did to get there sits under it.
        const turn = this.turn && this.turn.agent === agent && !this.turn.body ? this.turn : this.#openTurn(agent, record, data);
        const body = this.#base("div", record, "msg__body md");
        if (isStructured(data.structured)) body.append(structuredCard(data.structured, this.agentInfo(agent).output));
        else if (content.trim()) body.append(renderMarkdown(content));
        else body.classList.add("msg__body--empty");
        turn.node.insertBefore(body, turn.tools);
        turn.node.classList.remove("msg--tools-only");
        turn.body = body;
        this.lastAgent = agent;
        this.lastContent = content;
        if (live) this.hooks.announce(`${name}: ${content.slice(0, 200)}`);
        break;
      }
      case "tool.called":
        this.#toolCalled(record, data, agent);
        break;
      case "ui.requested":
        this.ui.requested(record, live);
        break;
      case "ui.responded":
        this.ui.responded(record);
        break;
      case "ui.expired":
        this.ui.expired(record);
        break;
      case "tool.result":
        this.#toolResult(record, data);
        break;
      case "handoff": {
        const text = this.#handoffText(data.source || agent, data.target);
        // Ending the run is said by the terminal marker right after; here it is trace detail.
        if (TO_END.test(String(data.target ?? "").trim())) this.#trace(this.#marker(record, text, "trace"));
        else this.root.append(this.#marker(record, text, "marker--handoff"));
        break;
      }
      case "speaker.selected": {
        // Turn cards already say who speaks: who goes next is trace detail.
        this.lastSpeaker = data.speaker;
        const who = this.#userLike(data.speaker) ? "Your turn" : `${this.#shown(data.speaker) || "An agent"} speaks next`;
        this.#trace(this.#marker(record, who, "trace"));
        break;
      }
      case "input.requested":
        this.#inputRequested(record, data, agent, live);
        break;
      case "input.received": {
        this.lastUserText = String(data.text ?? "");
        const node = this.#base("li", record, "msg msg--user msg--answer");
        node.append(this.#head("You", { ts: record.ts, note: "answer" }), el("div", { class: "msg__body plain" }, data.text ?? ""));
        this.root.append(node);
        const request = this.requests.get(data.request_id) || [...this.requests.values()].find((r) => !r.answered);
        if (request) this.#closeRequest(request, "Answered.", true);
        if (this.status === "waiting_input" && ![...this.requests.values()].some((r) => !r.answered)) {
          this.#setStatus("running");
        }
        break;
      }
      case "file.uploaded":
        this.root.append(fileChip(record, this.#base("li", record, "marker")));
        break;
      case "run.completed": {
        const node = this.#marker(record, "Run completed", "marker--ok");
        // The summary is usually the last message again; show it only when it says something new.
        if (data.summary && data.summary !== this.lastContent) {
          node.append(el("p", { class: "marker__summary plain" }, data.summary));
        }
        this.root.append(node);
        this.#terminal("completed", record, live, "Run completed.");
        break;
      }
      case "run.failed": {
        const sentence = FAILURE_SENTENCES[data.reason] || "Something went wrong and the run stopped.";
        const node = this.#marker(record, sentence, "marker--error");
        if (data.error) {
          node.append(el("details", { class: "marker__details" }, el("summary", {}, "Details"),
            el("pre", {}, String(data.error))));
        }
        if (this.lastUserText) {
          const retry = el("button", { type: "button", class: "button button--small", "data-testid": "retry" }, "Retry");
          retry.addEventListener("click", () => {
            retry.disabled = true;
            if (!this.hooks.onRetry?.(this.lastUserText)) retry.disabled = false;
          });
          this.retries.push(retry);
          node.append(retry);
        }
        this.root.append(node);
        this.#terminal("failed", record, live, `Run failed. ${sentence}`);
        break;
      }
      case "run.suspended":
        // The run ended waiting on the user: its UI requests stay open; the answer starts the next run.
        this.#terminal("waiting", record, live, "Waiting for your answer.");
        break;
      case "run.stopped": {
        // A budget stop says which limit, how much was spent, and when a daily limit resets.
        const budget = data.reason === "budget" && data.budget ? data.budget : null;
        const resets = budget?.resets_at ? `; resets ${new Date(budget.resets_at).toLocaleString()}` : "";
        const text = budget
          ? `Stopped: budget reached (${budget.limit}: spent ${budget.spend} of ${budget.max}${resets})`
          : !data.by || data.by === this.me ? "Stopped by you" : `Stopped by ${data.by}`;
        this.root.append(this.#marker(record, text, "marker--stopped"));
        this.#terminal("stopped", record, live, `${text}.`);
        break;
      }
      case "hook.called":
        this.#trace(this.#marker(record, `Hook ${data.function} (${data.event}): ${data.outcome}${data.reason ? ` — ${data.reason}` : ""}`, "trace"));
        break;
      case "llm.call": {
        // A call that answered belongs to its agent's turn. Live, the streamed text opened that turn
        // first; replayed from storage (a finished message keeps no deltas), the call opens it, so
        // both render alike.
        const streaming = this.turn?.body && [...this.streams.values()].some((st) => st.body === this.turn.body);
        if (agent && !data.error && (this.turn?.agent !== agent || (this.turn.body && !streaming))) {
          this.#openTurn(agent, record, data);
        }
        const tokens = `${data.prompt_tokens ?? 0} → ${data.completion_tokens ?? 0} tokens`;
        const latency = data.latency_ms !== undefined ? `${Math.round(data.latency_ms)} ms` : null;
        const parts = [`LLM call${agent ? ` by ${agent}` : ""}`, data.model, tokens, latency, data.finish_reason,
          data.offline ? "fixture" : null, data.error ? `error: ${data.error}` : null];
        this.#trace(this.#marker(record, parts.filter(Boolean).join(" · "), "trace"));
        break;
      }
      case "output.invalid":
        this.#trace(this.#marker(record, invalidOutputText(data), "trace"));
        break;
      case "context.updated":
        this.#trace(this.#marker(record, `Context updated: ${Object.keys(data.variables || {}).join(", ") || "—"}`, "trace"));
        break;
      case "ag2.event":
        this.#trace(this.#marker(record, `AG2 event: ${data.name ?? "?"}`, "trace"));
        break;
      case "child.started":
        this.root.append(childThread(this.#base("li", record, ""), record));
        break;
      case "child.completed":
        this.root.append(this.#marker(record, childCompletedText(data), data.error ? "marker--error" : "marker--ok"));
        break;
      default:
        // A type this page does not know yet: keep it findable without cluttering the chat.
        this.#trace(this.#marker(record, `Event ${record.type}`, "trace"));
    }
  }

  /** Whether a name stands for the person in the chat (AG2's human proxy, a handoff back to them). */
  #userLike(name) {
    const role = this.agentInfo(name)?.role;
    return role === "user" || TO_USER.test(String(name ?? "").trim());
  }

  /** The name when the workflow shows that agent; null for a hidden (or unknown) one. */
  #shown(name) {
    if (!name) return null;
    if (this.visibleAgents && !this.visibleAgents.has(name)) return null;
    return name;
  }

  /** "Researcher handed the conversation to you", in words, whatever kind of handoff AG2 made. */
  #handoffText(source, target) {
    const from = this.#shown(source) || "An agent";
    const goal = String(target ?? "").trim();
    if (TO_END.test(goal)) return `${from} finished`;
    if (this.#userLike(goal)) return `${from} handed the conversation to you`;
    return `${from} handed the conversation to ${this.#shown(goal) || "another agent"}`;
  }

  /**
   * Follow what the run is doing from the records the user sees: who is working, whether text is
   * streaming, or nothing (idle, waiting for the user, ended). The page shows "‹agent› is working…".
   */
  #follow(record) {
    const data = record.data || {};
    // A fork's copies of its parent's messages (an answer's copy has no run): no run behind them.
    if (data.origin === "fork" || (record.type === "input.received" && !record.run_id)) return;
    const before = this.activity;
    switch (record.type) {
      case "run.started":
      case "input.received":
        this.activity = { agent: null, streaming: false };
        break;
      case "message.user":
        if (!this.activity) this.activity = { agent: null, streaming: false };
        break;
      case "speaker.selected":
        if (this.activity) {
          this.activity = this.#userLike(data.speaker)
            ? { agent: null, streaming: false, user: true }
            : { agent: this.#shown(data.speaker), streaming: false };
        }
        break;
      case "message.delta":
        if (this.activity) this.activity = { agent: this.#shown(record.agent), streaming: true };
        break;
      case "message.agent":
        // The agent finished its message; someone (perhaps hidden) works next.
        if (this.activity) this.activity = { agent: null, streaming: false };
        break;
      case "tool.called":
      case "tool.result":
        if (this.activity) this.activity = { agent: this.#shown(record.agent), streaming: false };
        break;
      case "input.requested":
      case "run.completed":
      case "run.failed":
      case "run.stopped":
      case "run.suspended":
        this.activity = null;
        break;
      default:
        return;
    }
    if (this.activity !== before) this.hooks.onActivity?.(this.workingText);
  }

  /** "Writer is working…", "Working…", or null when nothing is to be said (idle, streaming, your turn). */
  get workingText() {
    const a = this.activity;
    if (!a || a.streaming || a.user) return null;
    return a.agent ? `${a.agent} is working…` : "Working…";
  }

  /** Trace detail goes into the open turn card (it happened during that turn), else into the log. */
  #trace(node) {
    if (!this.turn) {
      this.root.append(node);
      return;
    }
    if (!this.turn.trace) {
      this.turn.trace = el("ol", { class: "turn__trace" });
      this.turn.node.append(this.turn.trace);
    }
    this.turn.trace.append(node);
  }

  /**
   * A piece of a streamed message: the agent's card grows in place (one Markdown render per frame).
   * The body is no `event` element yet: it becomes the `message.agent` event when that arrives.
   */
  #delta(record, data, agent) {
    const id = String(data.message_id ?? "");
    let stream = this.streams.get(id);
    if (!stream) {
      // The agent starts another message: an earlier one still open was abandoned (a retried call).
      for (const other of [...this.streams.values()]) {
        if (other.agent === agent) this.#abandon(other, "Incomplete: the model's reply was cut off and asked again.");
      }
      const joins = this.turn && this.turn.agent === agent && !this.turn.body;
      const turn = joins ? this.turn : this.#openTurn(agent, record, data);
      const body = el("div", {
        class: "msg__body md is-streaming",
        "data-testid": "stream",
        "data-message-id": id,
        "data-agent": agent || null,
        "aria-busy": "true",
      });
      turn.node.insertBefore(body, turn.tools);
      turn.node.classList.remove("msg--tools-only");
      turn.body = body;
      // A turn this stream opened shows the finished message's time, as a reload does (it keeps no deltas).
      stream = { id, agent, body, text: "", frame: 0, head: joins ? null : turn.node.querySelector(".msg__head") };
      this.streams.set(id, stream);
    }
    stream.text += String(data.text ?? "");
    stream.body.dataset.length = String(stream.text.length);
    if (!stream.frame) {
      stream.frame = requestAnimationFrame(() => {
        stream.frame = 0;
        if (this.streams.get(stream.id) === stream) stream.body.replaceChildren(renderMarkdown(stream.text));
      });
    }
  }

  /** The streamed message is complete: its body becomes the `message.agent` event, with the final text. */
  #finishStream(stream, record, content) {
    cancelAnimationFrame(stream.frame);
    this.streams.delete(stream.id);
    const body = stream.body;
    body.classList.remove("is-streaming");
    body.removeAttribute("aria-busy");
    body.removeAttribute("data-length");
    body.setAttribute("data-testid", "event");
    body.setAttribute("data-seq", record.seq);
    body.setAttribute("data-type", record.type);
    const time = stream.head && timeEl(record.ts);
    if (time) stream.head.querySelector("time")?.replaceWith(time);
    if (content.trim()) body.replaceChildren(renderMarkdown(content));
    else {
      body.replaceChildren();
      body.classList.add("msg__body--empty");
    }
  }

  /** A streamed message that will never be finished: keep its text, say so. */
  #abandon(stream, note = "Incomplete: the run ended before this message was finished.") {
    cancelAnimationFrame(stream.frame);
    this.streams.delete(stream.id);
    const body = stream.body;
    body.classList.remove("is-streaming");
    body.classList.add("msg__body--incomplete");
    body.removeAttribute("aria-busy");
    body.setAttribute("data-incomplete", "true");
    body.replaceChildren(renderMarkdown(stream.text));
    body.append(el("p", { class: "msg__incomplete", "data-testid": "incomplete" }, note));
  }

  #terminal(status, record, live, announcement) {
    for (const stream of [...this.streams.values()]) this.#abandon(stream);
    this.#setStatus(status);
    if (live) this.hooks.announce(announcement);
    this.hooks.onTerminal(record, live);
  }

  /** A new turn card for `agent`: header now, message body and folded tools as they arrive. */
  #openTurn(agent, record, data = {}) {
    const node = el("li", { class: "msg msg--agent msg--tools-only", "data-testid": "turn", "data-agent": agent });
    node.append(this.#head(agent || "Agent", { role: data.role, ts: record.ts }));
    const tools = el("div", { class: "tools", hidden: true });
    node.append(tools);
    this.root.append(node);
    this.turn = { agent, node, body: null, tools, trace: null };
    return this.turn;
  }

  #toolCalled(record, data, agent) {
    const turn = this.turn && this.turn.agent === agent ? this.turn : this.#openTurn(agent, record);
    turn.tools.hidden = false;
    const state = el("span", { class: "tool__state" }, "waiting for result");
    const details = this.#base("details", record, "tool");
    details.setAttribute("data-call-id", data.call_id ?? "");
    details.setAttribute("data-tool", data.tool ?? "");
    details.append(
      el("summary", {}, el("span", { class: "tool__icon", "aria-hidden": "true" }, "⚙"),
        el("code", { class: "tool__name" }, data.tool ?? "?"),
        el("span", { class: "tool__preview" }, argumentsPreview(data.arguments)), state),
      el("div", { class: "tool__label" }, "Arguments"),
      el("pre", { class: "tool__args" }, prettyJson(data.arguments ?? "")),
    );
    turn.tools.append(details);
    if (data.call_id) this.calls.set(data.call_id, { details, state });
  }

  #toolResult(record, data) {
    const call = data.call_id ? this.calls.get(data.call_id) : null;
    const failed = Boolean(data.is_error);
    const result = this.#base("div", record, `tool__result${failed ? " tool__result--error" : ""}`);
    result.setAttribute("data-call-id", data.call_id ?? "");
    result.append(
      el("div", { class: "tool__label" }, failed ? "Error" : "Result"),
      el("pre", {}, prettyJson(data.content ?? "")),
    );
    if (call) {
      call.details.append(result);
      call.state.textContent = failed ? "failed" : "done";
      call.details.classList.toggle("tool--error", failed);
      return;
    }
    // A result whose call is not shown (hidden caller): show it folded on its own.
    const turn = this.turn && this.turn.agent === record.agent ? this.turn : this.#openTurn(record.agent, record);
    turn.tools.hidden = false;
    turn.tools.append(el("details", { class: `tool${failed ? " tool--error" : ""}` },
      el("summary", {}, el("span", { class: "tool__icon", "aria-hidden": "true" }, "⚙"),
        el("code", { class: "tool__name" }, data.tool ?? "?"), el("span", { class: "tool__state" }, failed ? "failed" : "done")),
      result));
  }

  #inputRequested(record, data, agent, live) {
    const requestId = String(data.request_id ?? "");
    // AG2 asks on behalf of the group; the agent that spoke last is who the user is answering.
    const name = agent || this.lastAgent || "Workflow";
    const node = this.#base("li", record, "msg msg--input");
    node.setAttribute("data-request-id", requestId);
    node.append(this.#head(name, { ts: record.ts, note: "asks for your input" }));
    // The agent's own words (its last visible message), never AG2's console prompt.
    const own = data.prompt && !AG2_PROMPT.test(String(data.prompt)) ? String(data.prompt) : null;
    const question = own || this.lastContent || "";
    node.append(el("div", { class: "msg__body md", "data-testid": "input-question" },
      question.trim() ? renderMarkdown(question) : el("p", {}, "The agents are waiting for your answer.")));
    const fieldId = `answer-${record.seq}`;
    const textarea = el("textarea", { id: fieldId, rows: 2, required: true, autocomplete: "off" });
    const status = el("p", { class: "input-form__status", role: "status" });
    const form = el("form", { class: "input-form", "data-testid": "input-form", "data-request-id": requestId },
      el("label", { for: fieldId }, `Your answer to ${name}`),
      el("div", { class: "input-form__row" }, textarea, el("button", { type: "submit", class: "button button--primary" }, "Send answer")),
      status);
    const request = { id: requestId, node, form, status, answered: false };
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = textarea.value.trim();
      if (!text || request.answered) return;
      if (this.hooks.onInputResponse(requestId, text)) {
        form.classList.add("is-sending");
        for (const control of form.elements) control.disabled = true;
        status.textContent = "Sending…";
      } else {
        status.textContent = "Not connected: the answer was not sent. Send it again when the indicator says Live.";
      }
    });
    textarea.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    node.append(form);
    this.root.append(node);
    this.requests.set(requestId, request);
    if (TERMINAL.has(`run.${this.status}`)) {
      this.#closeRequest(request, "The run ended before this was answered.");
    } else {
      this.#setStatus("waiting_input");
      if (live) this.hooks.announce(`${name} asks for your input: ${question.slice(0, 200)}`);
      this.hooks.onInputRequested(textarea, live);
    }
  }

  #closeRequest(request, note, answered = false) {
    request.answered = request.answered || answered;
    request.node.classList.add(answered ? "is-answered" : "is-closed");
    request.form.replaceWith(el("p", { class: "input-form__closed" }, note));
  }

  /** Whether a human-input request is waiting for an answer (the composer defers to it). */
  get pendingRequest() {
    return [...this.requests.values()].find((r) => !r.answered && r.form.isConnected) || null;
  }
}
