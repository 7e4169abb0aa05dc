// ChatUI controller: wires REST, the chat stream, the conversation view and the page chrome.

import { api, ApiError, currentUser, getToken, onUnauthorized, request, setToken, takeTokenFromFragment } from "./api.js";
import { refreshChats, renderChatList } from "./chatlist.js";
import { ACTIVE_STATUSES, ERROR } from "./codes.js";
import { attachFiles } from "./files.js";
import { forgetAllHistory, forgetHistory, loadHistory, saveHistory } from "./history.js";
import {
  $,
  announce,
  askForToken,
  DEFAULT_HEARTBEAT_S,
  preference,
  reportFailure,
  showError,
  state,
  STATUS_LABELS,
  ui,
} from "./page.js";
import { forkChat, offerForks } from "./lineage.js";
import { ChatView, el } from "./render.js";
import { setupCompare } from "./replay.js";
import { ChatStream } from "./stream.js";
import { loadMetrics, refreshMetricsAfterRun } from "./summary.js";
import { agentInfo, loadWorkflows, renderWorkflowInfo, startChat, visibleAgents } from "./workflows.js";

const CONNECTION_LABELS = {
  idle: "No chat open",
  connecting: "Connecting…",
  "catching-up": "Catching up…",
  live: "Live",
  reconnecting: "Reconnecting…",
  polling: "Live connection refused · updating every 2 s",
  closed: "Disconnected",
};

// ---------------------------------------------------------------- connection indicator

function setConnection(name, detail = {}) {
  ui.connection.dataset.state = name;
  let label = CONNECTION_LABELS[name] || name;
  if (name === "reconnecting" && detail.retryAt) {
    const seconds = Math.max(1, Math.round((detail.retryAt - Date.now()) / 1000));
    label = `Reconnecting in ${seconds} s…`;
  }
  if (name === "closed" && detail.reason) label = `Disconnected (${detail.reason.replace("_", " ")})`;
  ui.connectionLabel.textContent = label;
  ui.connection.title = name === "live"
    ? `Streaming from seq ${view.lastSeq}`
    : name === "polling"
      ? "The runtime refused the WebSocket, so this page reads the chat over HTTP every 2 s instead."
      : label;
}

// ---------------------------------------------------------------- conversation view

const view = new ChatView(ui.events, {
  onStatus: (status) => {
    if (!ACTIVE_STATUSES.has(status)) state.stopping = false;
    renderStatus();
  },
  onActivity: (text) => {
    ui.working.hidden = !text;
    ui.workingText.textContent = text || "";
  },
  visibleAgents,
  onRetry: (text) => {
    sendText(text).then((sent) => {
      if (sent) ui.composerText.focus({ preventScroll: true });
    });
    return true;
  },
  onOffline: () => {
    ui.chatOffline.hidden = false;
  },
  onTerminal: (record, live) => {
    // A run that ended while the page was away is caught in the replay: see onReplayDone.
    if (!live) return;
    refreshMetricsAfterRun(state.chatId, record.seq);
    refreshChats();
  },
  announce,
  onInputResponse: (requestId, text) => {
    if (state.stream && state.stream.send({ type: "input.response", request_id: requestId, text })) return true;
    // No socket (refused, or reconnecting): REST answers the request; the log shows the answer.
    const chatId = state.chatId;
    api.sendMessage(chatId, text, requestId).catch(reportFailure);
    return true;
  },
  onUiResponse: (requestId, answer) =>
    Boolean(state.stream && state.stream.send({ type: "ui.response", request_id: requestId, answer })),
  onInputRequested: (textarea, live) => {
    updateComposer();
    const active = document.activeElement;
    if (live && (!active || active === document.body || active === ui.composerText)) {
      textarea.focus({ preventScroll: true });
    }
  },
});

/** The chat's status from its events, or from the chat list until an event says more. */
function currentStatus() {
  return view.status !== "unknown" ? view.status : state.listedStatus;
}

function renderStatus() {
  const status = currentStatus();
  const active = ACTIVE_STATUSES.has(status);
  if (active && !state.runActive) showRunning();
  state.runActive = active;
  const label = STATUS_LABELS[status] || status;
  ui.chatStatus.textContent = label;
  ui.chatStatus.dataset.status = status;
  ui.stopButton.disabled = !ACTIVE_STATUSES.has(status) || state.stopping;
  ui.stopButton.textContent = state.stopping ? "Stopping…" : "Stop";
  const listed = state.chats.find((c) => c.chat_id === state.chatId);
  if (listed && status !== "unknown" && listed.status !== status) {
    // Keep the chat list in step with what the stream says, without waiting for a refetch.
    listed.status = status;
    renderChatList();
  }
  const workflow = ui.chatTitle.textContent;
  if (!ui.chatMeta.textContent) {
    const first = view.records.find((r) => r.type === "message.user");
    if (first) ui.chatMeta.textContent = chatHeading(first.data?.content);
  }
  document.title = `${ACTIVE_STATUSES.has(status) ? "● " : ""}${workflow} — Mozaiks`;
  updateComposer();
}

/** A chat's title for the header: the start of its first message, on one line. */
function chatHeading(text) {
  const line = String(text ?? "").replace(/\s+/g, " ").trim();
  return line.length > 120 ? `${line.slice(0, 119)}…` : line;
}

/** While a run goes, the summary says so (its numbers come when the run has ended). */
function showRunning() {
  state.metricsTimers.forEach(clearTimeout);
  ui.summaryBody.replaceChildren(el("p", { class: "muted", "data-testid": "summary-running" },
    "Running… the numbers appear when the run ends."));
}

// The message box stays focusable while the agents work (Escape there stops the run); only sending waits.
function updateComposer() {
  const status = currentStatus();
  let hint = "Enter sends · Shift+Enter adds a line";
  let blocked = false;
  if (view.pendingRequest) {
    blocked = true;
    hint = "An agent is waiting for your answer above.";
  } else if (ACTIVE_STATUSES.has(status)) {
    blocked = true;
    hint = "The agents are working. Escape or Stop interrupts them.";
  }
  ui.composerText.disabled = false;
  ui.composerText.setAttribute("aria-disabled", String(blocked));
  ui.composerButton.disabled = blocked;
  ui.composerText.placeholder = blocked ? "" : view.records.length ? "Continue the conversation…" : "Message";
  ui.composerHint.textContent = hint;
}

function isNearBottom() {
  const list = ui.events;
  return list.scrollHeight - list.scrollTop - list.clientHeight < 120;
}

function scheduleScroll(stick) {
  if (!stick || state.scrollPending) return;
  state.scrollPending = true;
  requestAnimationFrame(() => {
    state.scrollPending = false;
    ui.events.scrollTop = ui.events.scrollHeight;
  });
}

function scheduleSave() {
  clearTimeout(state.saveTimer);
  state.saveTimer = setTimeout(flushHistory, 250);
}

function flushHistory() {
  clearTimeout(state.saveTimer);
  if (view.chatId && view.records.length) saveHistory(view.chatId, view.lastSeq, view.storableRecords());
}

// ---------------------------------------------------------------- opening a chat

function closeStream() {
  if (state.stream) state.stream.close();
  state.stream = null;
}

function showStart() {
  flushHistory();
  closeStream();
  state.chatId = null;
  view.reset(null);
  ui.chatView.hidden = true;
  ui.startView.hidden = false;
  setConnection("idle");
  document.title = "Mozaiks ChatUI";
  renderChatList();
}

function openChat(chatId) {
  // Re-opening the chat on screen only reconnects a stream that was closed for good.
  if (chatId === state.chatId && state.stream && state.stream.state !== "closed") return;
  const listed = state.chats.find((c) => c.chat_id === chatId);
  flushHistory();
  closeStream();
  state.metricsTimers.forEach(clearTimeout);
  state.chatId = chatId;
  state.stopping = false;
  state.listedStatus = listed?.status || "unknown";
  state.runActive = false;
  view.reset(chatId);
  ui.startView.hidden = true;
  ui.chatView.hidden = false;
  ui.chatOffline.hidden = true;
  ui.chatTitle.textContent = listed?.workflow || "Chat";
  ui.chatMeta.textContent = listed?.title ? chatHeading(listed.title) : "";
  ui.chatView.dataset.chatId = chatId;
  ui.working.hidden = true;
  ui.summaryBody.replaceChildren(el("p", { class: "muted" }, "Loading…"));
  renderChatList();

  view.agentInfo = (name) => agentInfo(ui.chatTitle.textContent, name);
  view.me = currentUser();
  const workflowName = listed?.workflow;
  view.visibleAgents = workflowName ? visibleAgents(workflowName) : null;
  // Show what this tab already rendered, then resume the stream right after it.
  const stored = loadHistory(chatId);
  for (const record of stored.records) view.apply(record, false);
  if (view.records.length && view.records[0].workflow) ui.chatTitle.textContent = view.records[0].workflow;
  renderStatus();
  scheduleScroll(true);

  let replayed = 0;
  const stream = new ChatStream({
    chatId,
    after: () => view.lastSeq,
    heartbeatS: Number(state.info.heartbeat_s) || DEFAULT_HEARTBEAT_S,
    token: api.token,
    onEvent: (record) => {
      const stick = isNearBottom();
      if (!view.apply(record, stream.state === "live")) return;
      if (stream.state !== "live") replayed++;
      if (record.type === "chat.created" || ui.chatTitle.textContent === "Chat") {
        ui.chatTitle.textContent = record.workflow || ui.chatTitle.textContent;
      }
      scheduleScroll(stick);
      scheduleSave();
    },
    onReplayDone: () => {
      flushHistory();
      const listed = state.chats.find((c) => c.chat_id === chatId);
      if (listed?.status) state.listedStatus = listed.status;
      renderStatus();
      if (replayed > 0 && !ACTIVE_STATUSES.has(view.status) && view.status !== "unknown") {
        // The run ended while this page was away (or before it opened the chat): fresh numbers.
        refreshMetricsAfterRun(chatId, view.lastSeq);
        refreshChats();
      }
      replayed = 0;
    },
    onError: (code, message) => {
      const answerRefused = [ERROR.INVALID_ANSWER, ERROR.REQUEST_CLOSED, ERROR.UNKNOWN_REQUEST].includes(code);
      if (answerRefused && view.ui.refused(message)) return; // shown on the request, beside its answer
      showError(`Server: ${message}`, code);
      if (state.stopping) {
        state.stopping = false;
        renderStatus();
      }
    },
    onState: (name, detail) => {
      setConnection(name, detail);
      if (name === "reconnecting" && detail.retryAt) {
        // Keep the countdown honest while waiting.
        const tick = setInterval(() => {
          if (stream.state !== "reconnecting" || Date.now() > detail.retryAt) clearInterval(tick);
          else setConnection(name, detail);
        }, 1000);
      }
    },
    onFatal: (reason) => {
      if (reason === "not_found") {
        forgetHistory(chatId);
        showError(`Chat ${chatId} was not found on this runtime.`, "not_found");
      } else if (reason === "unauthorized") {
        askForToken("The runtime refused the stream: a valid token is needed.");
      } else {
        showError(`The runtime refused the stream for chat ${chatId}.`, reason);
      }
    },
    poll: (after) => api.events(chatId, after),
    probe: async () => {
      try {
        await request("GET", `/api/chats/${encodeURIComponent(chatId)}`);
        return null;
      } catch (err) {
        if (!(err instanceof ApiError)) return null;
        if (err.status === 401) return "unauthorized";
        if (err.status === 403) return "forbidden";
        // Not 404: a brand-new chat may not be projected yet; the socket itself says 4404 if unknown.
        return null;
      }
    },
  });
  state.stream = stream;
  stream.start();
  if (!state.runActive) loadMetrics(chatId);
  if (state.focusComposer) {
    // Just started from the form: the user's next move is here (or in an input card once asked).
    state.focusComposer = false;
    ui.composerText.focus({ preventScroll: true });
  }
}

function route() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const chatId = params.get("chat");
  document.body.classList.remove("nav-open");
  ui.navToggle.setAttribute("aria-expanded", "false");
  if (chatId) openChat(chatId);
  else showStart();
}

// ---------------------------------------------------------------- composer and stop

async function sendFromComposer(event) {
  event.preventDefault();
  const text = ui.composerText.value.trim();
  if (!text || !state.chatId) return;
  if (view.pendingRequest) {
    view.pendingRequest.form.querySelector("textarea")?.focus();
    return;
  }
  if (ACTIVE_STATUSES.has(currentStatus())) return; // the hint says why; Escape stops the run
  if (await sendText(text)) ui.composerText.value = "";
}

/** Send a user message to the chat (socket, else REST); true when the runtime has it. */
async function sendText(text) {
  const chatId = state.chatId;
  if (!chatId) return false;
  ui.composerButton.disabled = true;
  let sent = false;
  try {
    if (!(state.stream && state.stream.send({ type: "user.message", text }))) {
      // Not connected right now: REST appends the message; the stream shows it once back.
      await api.sendMessage(chatId, text);
    }
    sent = true;
  } catch (err) {
    reportFailure(err);
  } finally {
    updateComposer();
  }
  if (sent && !ACTIVE_STATUSES.has(currentStatus())) ui.composerHint.textContent = "Sent. Waiting for the agents…";
  return sent;
}

async function stopRun() {
  if (!state.chatId || !ACTIVE_STATUSES.has(currentStatus()) || state.stopping) return;
  state.stopping = true;
  renderStatus();
  // Stop disables itself: the message box is where the user goes on from.
  ui.composerText.focus({ preventScroll: true });
  try {
    if (!(state.stream && state.stream.send({ type: "chat.stop" }))) await api.stop(state.chatId);
  } catch (err) {
    state.stopping = false;
    renderStatus();
    reportFailure(err);
  }
}

// ---------------------------------------------------------------- auth

function applyNewToken(token) {
  if (setToken(token)) {
    // Another identity must not see what this tab cached for the previous one.
    forgetAllHistory();
  }
  ui.tokenForget.hidden = !getToken();
  const chatId = state.chatId;
  state.chatId = null;
  closeStream();
  boot().then(() => {
    if (chatId) openChat(chatId);
  });
}

// ---------------------------------------------------------------- start-up

async function loadInfo() {
  try {
    const info = await api.info();
    if (info && typeof info === "object") state.info = { ...state.info, ...info };
  } catch (err) {
    // An older runtime without /api/info: defaults apply; a 401 opens the token dialog.
    if (!(err instanceof ApiError) || (err.status !== 404 && err.status !== 401)) reportFailure(err);
  }
  ui.runtimeOffline.hidden = !state.info.offline;
  ui.runtimeVersion.textContent = state.info.version ? `v${state.info.version}` : "";
  if (state.info.auth) {
    ui.tokenButton.hidden = false;
    if (!getToken()) askForToken("This runtime requires a token (MOZAIKS_AUTH_SECRET is set).");
  }
}

async function boot() {
  await loadInfo();
  await Promise.all([loadWorkflows(), refreshChats()]);
}

function bindEvents() {
  ui.startForm.addEventListener("submit", startChat);
  ui.workflowSelect.addEventListener("change", renderWorkflowInfo);
  ui.composer.addEventListener("submit", sendFromComposer);
  for (const textarea of [ui.composerText, ui.startMessage]) {
    textarea.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        textarea.form.requestSubmit();
      }
    });
  }
  ui.stopButton.addEventListener("click", stopRun);
  ui.composerText.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && ACTIVE_STATUSES.has(currentStatus())) {
      event.preventDefault();
      stopRun();
    }
  });
  // The skip link moves focus without touching the route (its #events would otherwise close the chat).
  $("skip-link").addEventListener("click", (event) => {
    event.preventDefault();
    const target = ui.chatView.hidden ? ui.startMessage : ui.events;
    target.focus();
  });
  $("refresh-chats").addEventListener("click", refreshChats);
  ui.navToggle.addEventListener("click", () => {
    const open = document.body.classList.toggle("nav-open");
    ui.navToggle.setAttribute("aria-expanded", String(open));
    if (open) $("new-chat").focus();
  });
  ui.summaryToggle.addEventListener("click", () => {
    const open = ui.chatView.classList.toggle("summary-open");
    ui.summaryToggle.setAttribute("aria-expanded", String(open));
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && document.body.classList.contains("nav-open")) {
      document.body.classList.remove("nav-open");
      ui.navToggle.setAttribute("aria-expanded", "false");
      ui.navToggle.focus();
    }
  });
  ui.traceToggle.checked = preference("mozaiks.trace") === "1";
  ui.events.classList.toggle("show-trace", ui.traceToggle.checked);
  ui.traceToggle.addEventListener("change", () => {
    ui.events.classList.toggle("show-trace", ui.traceToggle.checked);
    preference("mozaiks.trace", ui.traceToggle.checked ? "1" : "0");
  });
  ui.tokenButton.addEventListener("click", () => askForToken("Paste a bearer token (JWT) for this runtime."));
  ui.tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = ui.tokenInput.value.trim();
    if (!token) return;
    ui.tokenDialog.close();
    applyNewToken(token);
  });
  $("token-cancel").addEventListener("click", () => ui.tokenDialog.close());
  ui.tokenForget.addEventListener("click", () => {
    ui.tokenDialog.close();
    applyNewToken("");
  });
  window.addEventListener("hashchange", () => {
    const token = takeTokenFromFragment();
    if (token !== null) applyNewToken(token);
    else route();
  });
  window.addEventListener("pagehide", flushHistory);
  offerForks(ui.events, async (seq, button) => {
    button.disabled = true;
    try {
      const forked = await forkChat(state.chatId, seq);
      await refreshChats();
      location.hash = `chat=${encodeURIComponent(forked)}`;
    } catch (err) {
      reportFailure(err);
    } finally {
      button.disabled = false;
    }
  });
  attachFiles({ composer: ui.composer, dropZone: ui.chatView, chatId: () => state.chatId, onError: (text) => showError(text) });
  setupCompare();
  onUnauthorized(() => askForToken("The runtime answered 401: a valid token is needed."));
}

async function main() {
  const token = takeTokenFromFragment();
  if (token !== null && setToken(token)) forgetAllHistory();
  bindEvents();
  await boot();
  route();
}

main();
