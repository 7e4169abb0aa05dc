// REST client of the runtime: bearer token handling and errors a user can read.
// It reads only fields that /schema documents (errors: `{error, detail}`).

const TOKEN_KEY = "mozaiks.token";

/** An HTTP request that failed, with what the server said. */
export class ApiError extends Error {
  constructor(status, message, detail) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.detail = detail;
  }
}

/** The bearer token of this tab (sessionStorage: it survives a reload, not the browser). */
export function getToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

/** Store or forget the bearer token; returns true when it changed. */
export function setToken(token) {
  const value = (token || "").trim();
  if (value === getToken()) return false;
  try {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // Private mode without storage: the token then lives until the next reload only.
  }
  memoryToken = value;
  return true;
}

let memoryToken = "";

function currentToken() {
  return getToken() || memoryToken;
}

/** Take `#token=...` out of the URL fragment (so it is not bookmarked or shown); null when absent. */
export function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const token = params.get("token");
  if (token === null) return null;
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  return token.trim();
}

function errorMessage(status, body) {
  if (body && typeof body === "object") {
    const text = body.detail || body.error;
    if (typeof text === "string" && text) return text;
  }
  if (typeof body === "string" && body.trim()) return body.trim().slice(0, 300);
  return `HTTP ${status}`;
}

/** Listeners told when any request answers 401, so the page can ask for a token. */
const unauthorizedListeners = new Set();
export function onUnauthorized(listener) {
  unauthorizedListeners.add(listener);
}

/** Fetch JSON from the runtime; throws ApiError with the server's message on failure. */
export async function request(method, path, body) {
  const headers = { Accept: "application/json" };
  const token = currentToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, `Cannot reach the runtime (${method} ${path}): ${err.message}`);
  }
  const type = response.headers.get("Content-Type") || "";
  let payload = null;
  if (response.status !== 204) {
    payload = type.includes("json") ? await response.json().catch(() => null) : await response.text();
  }
  if (!response.ok) {
    if (response.status === 401) unauthorizedListeners.forEach((fn) => fn());
    const message = `${method} ${path} failed: ${errorMessage(response.status, payload)}`;
    throw new ApiError(response.status, message, payload);
  }
  return payload;
}

/** The user id the token names (`sub`), or "local" without a token (local mode). */
export function currentUser() {
  const token = currentToken();
  if (!token) return "local";
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return String(JSON.parse(atob(part)).sub || "");
  } catch {
    return "";
  }
}

export const api = {
  info: () => request("GET", "/api/info"),
  workflows: async () => (await request("GET", "/api/workflows")).workflows,
  chats: async () => (await request("GET", "/api/chats")).chats,
  startChat: (workflow, message, context) =>
    request("POST", "/api/chats", { workflow, message, context }),
  sendMessage: (chatId, text, requestId) =>
    request("POST", `/api/chats/${encodeURIComponent(chatId)}/messages`,
      requestId ? { message: text, request_id: requestId } : { message: text }),
  events: async (chatId, after) =>
    (await request("GET", `/api/chats/${encodeURIComponent(chatId)}/events?after=${after}&limit=500`)).events,
  stop: (chatId) => request("POST", `/api/chats/${encodeURIComponent(chatId)}/stop`),
  metrics: (chatId) => request("GET", `/metrics/perf/chat/${encodeURIComponent(chatId)}`),
  token: currentToken,
};
