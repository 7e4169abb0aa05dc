// Page chrome shared by the ChatUI modules: elements, state, preferences, errors, the token dialog.

import { ApiError, getToken } from "./api.js";
import { el } from "./render.js";

export const $ = (id) => document.getElementById(id);
export const DEFAULT_HEARTBEAT_S = 15;
export const STATUS_LABELS = {
  unknown: "—",
  created: "Created",
  forked: "Forked",
  running: "Running",
  waiting_input: "Waiting for you",
  waiting: "Waiting for your answer",
  completed: "Completed",
  failed: "Failed",
  stopped: "Stopped",
};

export const state = {
  info: { heartbeat_s: DEFAULT_HEARTBEAT_S, auth: false, offline: false },
  workflows: [],
  chats: [],
  chatId: null,
  stream: null,
  saveTimer: 0,
  scrollPending: false,
  stopping: false,
  listedStatus: "unknown",
  // Whether the open chat has a run going (its summary then says "Running…").
  runActive: false,
  metricsTimers: [],
  // Set by the start form: the chat it opens puts focus in its message box.
  focusComposer: false,
};

export const ui = {
  events: $("events"),
  errors: $("errors"),
  connection: $("connection"),
  connectionLabel: document.querySelector("#connection .connection__label"),
  announcer: $("announcer"),
  startView: $("start-view"),
  chatView: $("chat-view"),
  startForm: $("start-form"),
  workflowSelect: $("workflow"),
  workflowInfo: $("workflow-info"),
  startMessage: $("start-message"),
  startContext: $("start-context"),
  startButton: $("start-button"),
  chatTitle: $("chat-title"),
  chatMeta: $("chat-meta"),
  chatStatus: $("chat-status"),
  chatOffline: $("chat-offline"),
  stopButton: $("stop-button"),
  composer: $("composer"),
  composerText: $("composer-text"),
  composerButton: $("composer-button"),
  composerHint: $("composer-hint"),
  working: $("working"),
  workingText: $("working-text"),
  chatList: $("chat-list"),
  chatListEmpty: $("chat-list-empty"),
  summaryBody: $("summary-body"),
  summaryToggle: $("summary-toggle"),
  traceToggle: $("trace-toggle"),
  navToggle: $("nav-toggle"),
  runtimeOffline: $("runtime-offline"),
  runtimeVersion: $("runtime-version"),
  tokenButton: $("token-button"),
  tokenDialog: $("token-dialog"),
  tokenForm: $("token-form"),
  tokenInput: $("token-input"),
  tokenReason: $("token-reason"),
  tokenForget: $("token-forget"),
};

/** Read (or with `value`, write) a small UI preference; storage may be disabled, which is fine. */
export function preference(key, value) {
  try {
    if (value === undefined) return localStorage.getItem(key);
    localStorage.setItem(key, value);
  } catch {
    // Without storage the page still works; it just does not remember the choice.
  }
  return value ?? null;
}

// ---------------------------------------------------------------- errors and announcements

/** Show an error the user can read and dismiss; the newest stays on top, at most four kept. */
export function showError(message, code = "") {
  const text = code ? `${message} (${code})` : message;
  const dismiss = el("button", { type: "button", class: "icon-button", "aria-label": "Dismiss error" }, "×");
  const item = el("div", { class: "error", "data-testid": "error" }, el("p", {}, text), dismiss);
  dismiss.addEventListener("click", () => item.remove());
  ui.errors.prepend(item);
  while (ui.errors.children.length > 4) ui.errors.lastElementChild.remove();
}

export function reportFailure(err) {
  if (err instanceof ApiError && err.status === 401) return; // the token dialog handles it
  showError(err instanceof Error ? err.message : String(err));
}

export function announce(text) {
  // Replacing the text of a polite live region makes screen readers read the new message.
  ui.announcer.textContent = text;
}

// ---------------------------------------------------------------- auth

export function askForToken(reason) {
  ui.tokenReason.textContent = reason;
  ui.tokenButton.hidden = false;
  ui.tokenForget.hidden = !getToken();
  if (!ui.tokenDialog.open) {
    ui.tokenInput.value = "";
    ui.tokenDialog.showModal();
  }
}
