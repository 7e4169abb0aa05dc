// Child workflows in the ChatUI: a `child.started` record becomes a collapsible sub-thread that
// follows the child chat's own WebSocket (so it grows live), and `child.completed` a marker.

import { api } from "./api.js";
import { ChatView, el } from "./render.js";
import { ChatStream } from "./stream.js";

const HEARTBEAT_S = 15;
// How often a sub-thread checks that it is still on the page (another chat opened: it closes).
const ATTACHED_CHECK_MS = 2000;
const OUTCOMES = { "run.completed": "completed", "run.failed": "failed", "run.stopped": "stopped", "run.suspended": "waiting" };

/**
 * Fill `node` (the record's <li>) with the child's sub-thread: a <details> whose summary names
 * the workflow and its status, and whose body renders the child chat's records as they arrive.
 */
export function childThread(node, record) {
  const data = record.data || {};
  const childId = String(data.child_chat_id || "");
  const status = el("span", { class: "child__status", "data-testid": "child-status" }, "starting");
  const events = el("ol", { class: "events child__events", "data-testid": "child-events", "aria-live": "off" });
  const details = el(
    "details",
    { class: "child", open: "", "data-child-chat": childId },
    el("summary", { class: "child__summary" },
      el("span", { class: "child__label" }, `Child workflow · ${data.workflow || "?"}`),
      data.tool ? el("span", { class: "child__tool" }, data.tool) : "",
      status),
    events,
  );
  node.classList.add("child-thread");
  node.append(details);
  if (!childId) return node;

  let stream = null;
  const view = new ChatView(events, {
    onStatus: (value) => {
      status.textContent = value;
      status.dataset.status = value;
    },
    onOffline: () => {},
    onTerminal: () => {},
    announce: () => {},
    onInputResponse: (requestId, text) =>
      Boolean(stream && stream.send({ type: "input.response", request_id: requestId, text })),
    onInputRequested: () => {},
  });
  view.reset(childId);
  stream = new ChatStream({
    chatId: childId,
    after: () => view.lastSeq,
    heartbeatS: HEARTBEAT_S,
    token: api.token,
    onEvent: (child) => view.apply(child, stream.state === "live"),
    onReplayDone: () => {},
    onError: () => {},
    onState: () => {},
    onFatal: (reason) => {
      status.textContent = `unavailable (${reason.replace("_", " ")})`;
    },
  });
  stream.start();
  // The sub-thread lives as long as its node is on the page.
  const check = setInterval(() => {
    if (!node.isConnected) {
      clearInterval(check);
      stream.close();
    }
  }, ATTACHED_CHECK_MS);
  return node;
}

/** The marker text of a `child.completed` record. */
export function childCompletedText(data) {
  const how = OUTCOMES[data.outcome] || data.outcome || "ended";
  return data.error ? `Child workflow ${how}: ${data.error}` : `Child workflow ${how}`;
}
