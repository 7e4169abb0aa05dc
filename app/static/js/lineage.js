// Forks in the ChatUI: "Fork from here" on every message, and a fork's origin with a link to its parent.

import { request } from "./api.js";
import { el } from "./render.js";

// The records a chat can be forked at (domain/lineage.py MESSAGE_TYPES).
const FORKABLE = new Set(["message.user", "message.agent", "input.received"]);

/** The marker line of a fork's origin: "Forked from chat … at message #N", linking to the parent. */
export function forkOrigin(forkedFrom) {
  const parent = String(forkedFrom.chat_id ?? "");
  const link = el("a", { href: `#chat=${encodeURIComponent(parent)}`, "data-testid": "fork-origin-link" },
    `chat ${parent.slice(0, 8)}`);
  return el("span", { class: "fork-origin", "data-testid": "fork-origin" },
    "Forked from ", link, ` at #${forkedFrom.seq}`);
}

/** Ask the runtime for a fork of `chatId` at `seq`; returns the new chat's id. */
export async function forkChat(chatId, seq) {
  const forked = await request("POST", `/api/chats/${encodeURIComponent(chatId)}/fork`, { at_seq: seq });
  return forked.chat_id;
}

const offered = new WeakSet();

function addButton(node, onFork) {
  if (node.dataset.testid !== "event" || !FORKABLE.has(node.dataset.type) || offered.has(node)) return;
  offered.add(node);
  const seq = Number(node.dataset.seq);
  const button = el("button", { type: "button", class: "button button--ghost button--small fork-button",
    "data-testid": "fork-button", "data-seq": seq, title: `Start a new chat from this message (#${seq})` }, "Fork from here");
  button.addEventListener("click", () => onFork(seq, button));
  // Beside the message's text, never inside it: a message's body reads as the agent wrote it.
  if (node.tagName === "LI") node.append(button);
  else node.after(button);
}

/**
 * Offer "Fork from here" on every message shown in `root` (also a streamed message once it is final).
 * `onFork(seq, button)` is called on a click.
 */
export function offerForks(root, onFork) {
  const visit = (node) => {
    if (!(node instanceof HTMLElement)) return;
    addButton(node, onFork);
    node.querySelectorAll('[data-testid="event"]').forEach((child) => addButton(child, onFork));
  };
  new MutationObserver((mutations) => {
    for (const mutation of mutations) {
      if (mutation.type === "attributes") visit(mutation.target);
      else mutation.addedNodes.forEach(visit);
    }
  }).observe(root, { childList: true, subtree: true, attributes: true, attributeFilter: ["data-testid"] });
}
