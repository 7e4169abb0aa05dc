// Files in the ChatUI: an attach button and drag and drop on the chat, upload progress, and a chip per
// `file.uploaded` record in the transcript (its download fetched with the tab's token).

import { api } from "./api.js";
import { el } from "./render.js";

function size(bytes) {
  const n = Number(bytes) || 0;
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

/** Download a chat's file with the bearer token (a plain link cannot send one). */
async function download(chatId, data) {
  const headers = {};
  const token = api.token();
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(`/api/chats/${encodeURIComponent(chatId)}/files/${data.sha256}`, { headers });
  if (!response.ok) throw new Error(`download failed: HTTP ${response.status}`);
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", { href: url, download: data.name || "file" });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** The transcript's chip of a `file.uploaded` record: name, size, type; a click downloads it. */
export function fileChip(record, base) {
  const data = record.data || {};
  const node = base;
  node.classList.add("file-chip");
  const button = el("button", { type: "button", class: "file-chip__button", "data-testid": "file-chip",
    "data-sha256": data.sha256, title: `Download ${data.name} (sha256 ${data.sha256})` },
    el("span", { class: "file-chip__name" }, data.name ?? "file"),
    el("span", { class: "file-chip__meta" }, `${size(data.size)} · ${data.content_type || "?"}`));
  button.addEventListener("click", () => download(record.chat_id, data).catch((err) => console.error(err)));
  node.append(button);
  return node;
}

/** Upload one file to the chat with progress (XMLHttpRequest: fetch reports no upload progress). */
function upload(chatId, file, progress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/api/chats/${encodeURIComponent(chatId)}/files`);
    const token = api.token();
    if (token) xhr.setRequestHeader("Authorization", `Bearer ${token}`);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) progress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        // not JSON: the status says enough
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new Error(body?.detail || `HTTP ${xhr.status}`));
    });
    xhr.addEventListener("error", () => reject(new Error("the upload did not reach the runtime")));
    const form = new FormData();
    form.append("data", file, file.name);
    xhr.send(form);
  });
}

/**
 * The attach button (in `composer`) and drag and drop (on `dropZone`) of the open chat (`chatId()`).
 * The chip appears when the `file.uploaded` record streams in; `onError(message)` reports a refusal.
 */
export function attachFiles({ composer, dropZone, chatId, onError }) {
  const input = el("input", { type: "file", id: "attach-input", class: "sr-only", multiple: true, "data-testid": "attach-input" });
  const button = el("label", { for: "attach-input", class: "button button--ghost attach-button", "data-testid": "attach-button",
    title: "Attach files (or drop them on the chat)" }, "Attach");
  const status = el("div", { class: "upload-status", "data-testid": "upload-status", role: "status" });
  composer.querySelector("textarea").before(input, button);
  composer.append(status);

  async function send(files) {
    const chat = chatId();
    if (!chat) return;
    for (const file of files) {
      const bar = el("progress", { max: 1, value: 0, "data-testid": "upload-progress" });
      const line = el("div", { class: "upload-status__item" }, el("span", {}, file.name), bar);
      status.append(line);
      try {
        await upload(chat, file, (fraction) => {
          bar.value = fraction;
        });
        line.remove();
      } catch (err) {
        line.remove();
        onError(`Upload of ${file.name} failed: ${err.message}`);
      }
    }
  }

  input.addEventListener("change", () => {
    send([...input.files]);
    input.value = "";
  });
  button.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });
  button.tabIndex = 0;
  dropZone.addEventListener("dragover", (event) => {
    if (![...(event.dataTransfer?.types || [])].includes("Files")) return;
    event.preventDefault();
    dropZone.classList.add("is-dropping");
  });
  dropZone.addEventListener("dragleave", (event) => {
    if (event.target === dropZone || !dropZone.contains(event.relatedTarget)) dropZone.classList.remove("is-dropping");
  });
  dropZone.addEventListener("drop", (event) => {
    if (!event.dataTransfer?.files?.length) return;
    event.preventDefault();
    dropZone.classList.remove("is-dropping");
    send([...event.dataTransfer.files]);
  });
}
