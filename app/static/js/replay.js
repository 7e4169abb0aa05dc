// "Compare with…": the open chat and another one side by side, turn by turn (GET /api/chats/{a}/diff/{b}).

import { request } from "./api.js";
import { $, reportFailure, state } from "./page.js";
import { el } from "./render.js";

const dialog = $("compare-dialog");
const form = $("compare-form");
const select = $("compare-with");
const result = $("compare-result");

function chatLabel(chat) {
  const title = chat.title || chat.workflow || chat.chat_id;
  return `${title} · ${chat.workflow} · ${chat.chat_id.slice(0, 8)}`;
}

/** One side of a turn: agent, text, tool calls and results (text only, never HTML). */
function side(turn) {
  if (!turn) return el("td", { class: "compare__side compare__side--missing" }, "—");
  const calls = (turn.tool_calls || []).map(([name, args]) => el("div", { class: "compare__tool" }, `${name}(${args})`));
  const results = (turn.tool_results || []).map((text) => el("div", { class: "compare__tool" }, `→ ${text}`));
  return el(
    "td",
    { class: "compare__side" },
    el("strong", {}, turn.agent),
    el("div", { class: "compare__text" }, turn.text),
    ...calls,
    ...results,
    el("div", { class: "muted" }, `${turn.prompt_tokens + turn.completion_tokens} tokens`),
  );
}

export function renderDiff(diff) {
  const s = diff.summary;
  const rows = diff.turns.map((pair) =>
    el(
      "tr",
      { "data-testid": "compare-turn", "data-changed": pair.changed.length ? "true" : "false" },
      el("th", { scope: "row" }, String(pair.index)),
      side(pair.a),
      side(pair.b),
      el("td", { class: "compare__changed" }, pair.changed.join(", ") || "same"),
    ),
  );
  result.replaceChildren(
    el(
      "p",
      { "data-testid": "compare-summary", "data-same": diff.same ? "true" : "false" },
      diff.same
        ? `Same: no turn changed (${Math.max(s.turns_a, s.turns_b)} turns).`
        : `${s.turns_changed} of ${Math.max(s.turns_a, s.turns_b)} turns changed · tokens ${s.tokens_delta >= 0 ? "+" : ""}${s.tokens_delta}`,
    ),
    el(
      "table",
      { class: "compare" },
      el("thead", {}, el("tr", {}, el("th", {}, "#"), el("th", {}, diff.a.slice(0, 8)), el("th", {}, diff.b.slice(0, 8)), el("th", {}, "changed"))),
      el("tbody", {}, ...rows),
    ),
  );
}

/** Open the dialog listing the other chats; comparing shows the diff below the picker. */
export function setupCompare() {
  $("compare-button").addEventListener("click", () => {
    const others = state.chats.filter((chat) => chat.chat_id !== state.chatId);
    select.replaceChildren(...others.map((chat) => el("option", { value: chat.chat_id }, chatLabel(chat))));
    result.replaceChildren();
    dialog.showModal();
  });
  $("compare-close").addEventListener("click", () => dialog.close());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!state.chatId || !select.value) return;
    try {
      const path = `/api/chats/${encodeURIComponent(state.chatId)}/diff/${encodeURIComponent(select.value)}`;
      renderDiff(await request("GET", path));
    } catch (err) {
      reportFailure(err);
    }
  });
}
