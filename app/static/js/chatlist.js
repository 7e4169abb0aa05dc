// The chat list in the side bar: the caller's chats, newest first, with their status.

import { api } from "./api.js";
import { STATUS_LABELS, reportFailure, state, ui } from "./page.js";
import { el } from "./render.js";

function chatTime(chat) {
  return chat.updated_at || chat.created_at || "";
}

function relativeTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  const seconds = (date.getTime() - Date.now()) / 1000;
  const format = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  const steps = [[60, "second"], [60, "minute"], [24, "hour"], [7, "day"], [4.35, "week"], [12, "month"]];
  let value = seconds;
  for (const [size, unit] of steps) {
    if (Math.abs(value) < size) return format.format(Math.round(value), unit);
    value /= size;
  }
  return format.format(Math.round(value), "year");
}

export function renderChatList() {
  const chats = [...state.chats].sort((a, b) => chatTime(b).localeCompare(chatTime(a)));
  ui.chatList.replaceChildren(
    ...chats.map((chat) => {
      const status = chat.status || "unknown";
      const time = el("time", { datetime: chatTime(chat), title: new Date(chatTime(chat)).toLocaleString() }, relativeTime(chatTime(chat)));
      const count = Number.isFinite(chat.message_count) ? `${chat.message_count} msg` : "";
      const link = el("a", {
        href: `#chat=${encodeURIComponent(chat.chat_id)}`,
        class: "chat-item",
        "data-testid": "chat-item",
        "data-chat-id": chat.chat_id,
        "aria-current": chat.chat_id === state.chatId ? "page" : null,
      },
      el("span", { class: "chat-item__title" }, chat.workflow || "Chat"),
      el("span", { class: "status-pill", "data-status": status }, STATUS_LABELS[status] || status),
      chat.title ? el("span", { class: "chat-item__text" }, chat.title) : null,
      el("span", { class: "chat-item__meta" }, time, count ? ` · ${count}` : ""));
      return el("li", {}, link);
    }),
  );
  ui.chatListEmpty.hidden = chats.length > 0;
}

export async function refreshChats() {
  try {
    state.chats = await api.chats();
    renderChatList();
  } catch (err) {
    reportFailure(err);
  }
}
